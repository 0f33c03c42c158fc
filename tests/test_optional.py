"""A command that needs a missing extra says which one, in one line."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from keras_lora import cli
from keras_lora.optional import MissingExtra, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEED_RESULTS = os.path.join(ROOT, "benchmarks", "results", "speed", "results.json")
LINE = (
    'keras-lora: this needs matplotlib; install it with pip install "keras-lora[bench]"'
)


def test_require_returns_the_module():
    assert require("json", extra="bench") is sys.modules["json"]
    assert require("os.path", extra="bench") is os.path


@pytest.mark.parametrize("module", ["matplotlib", "matplotlib.pyplot"])
def test_a_hidden_module_names_its_extra(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingExtra) as info:
        require(module, extra="bench")
    assert str(info.value) == LINE
    assert (info.value.module, info.value.extra) == (module, "bench")
    assert isinstance(info.value, ImportError)  # `except ImportError` still works.


def test_a_broken_dependency_of_an_installed_module_is_not_hidden(tmp_path):
    (tmp_path / "broken_mod_for_test.py").write_text("import nosuchmod_inside\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError) as info:
            require("broken_mod_for_test", extra="bench")
        assert not isinstance(info.value, MissingExtra)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("broken_mod_for_test", None)


def test_the_command_prints_one_line_and_exits_1(monkeypatch, tmp_path, capsys):
    # `compare --render` redraws a results.json's charts: it needs matplotlib.
    shutil.copy(SPEED_RESULTS, tmp_path / "results.json")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    status = cli.main(["compare", "--render", str(tmp_path / "results.json")])
    err = capsys.readouterr().err
    assert status == 1
    assert err == LINE + "\n"


def test_the_demo_says_so_before_it_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "demo"
    status = cli.main(["demo", "--out", str(out)])
    assert status == 1
    assert capsys.readouterr().err == LINE + "\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("module", "extra"),
    [("peft", "hf"), ("transformers", "hf"), ("tensorflow_datasets", "reddit")],
)
def test_each_optional_library_names_its_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtra, match=rf'keras-lora\[{extra}\]"$'):
        require(module, extra=extra)
