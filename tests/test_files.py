"""files.atomic_write: the whole file or the old one, never a broken one."""

import os

import pytest

import keras_lora.files as files_module
from keras_lora.files import atomic_write


def test_writes_and_replaces(tmp_path):
    target = str(tmp_path / "out.bin")
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    with open(target, "rb") as f:
        assert f.read() == b"second"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_relative_path_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write("plain.txt", b"x")
    assert (tmp_path / "plain.txt").read_bytes() == b"x"


@pytest.mark.parametrize("interrupt", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_keeps_the_old_file_and_no_temporary(
    tmp_path, monkeypatch, interrupt
):
    target = str(tmp_path / "out.bin")
    atomic_write(target, b"old")

    def failing_fsync(fd):
        raise interrupt

    monkeypatch.setattr(files_module.os, "fsync", failing_fsync)
    with pytest.raises(type(interrupt)):
        atomic_write(target, b"new data that never lands")
    assert (tmp_path / "out.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_missing_directory_raises_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(str(tmp_path / "no" / "such" / "dir.bin"), b"x")
    assert os.listdir(tmp_path) == []
