"""files.atomic_write: the whole file or the old one, never a broken one,
with the permissions `open` gives; files.staging_directory: a directory
with the permissions `os.makedirs` gives."""

import os
import stat

import pytest

import keras_lora.files as files_module
from keras_lora.files import atomic_write, staging_directory


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


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_and_staging_directories_get_the_umasks_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "adapter.json"), b"{}")
        staging = staging_directory(str(tmp_path), ".adapter-")
        with open(tmp_path / "plain", "wb"):
            pass
        os.makedirs(tmp_path / "made")
    finally:
        os.umask(old)
    # What a plain `open` and `os.makedirs` give, not tempfile's 0600/0700.
    assert _mode(tmp_path / "adapter.json") == _mode(tmp_path / "plain")
    assert _mode(tmp_path / "adapter.json") == 0o666 & ~umask
    assert _mode(staging) == _mode(tmp_path / "made") == 0o777 & ~umask
    assert os.listdir(staging) == []
