"""Every `>>>` example in the public docstrings of keras_lora runs, as
written, under doctest: one case per module, on every backend."""

import doctest
import importlib
import io
import pkgutil
import warnings

import pytest

import keras_lora

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(keras_lora.__path__, prefix="keras_lora.")
    # Importing a `__main__` module runs its command.
    if not info.name.endswith(".__main__")
) + ["keras_lora"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def public_examples(module) -> list[doctest.DocTest]:
    """The module's docstring tests, leaving out private names (`_x`)."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for test in finder.find(module, module.__name__):
        inner = test.name[len(module.__name__) :].split(".")
        if any(part.startswith("_") for part in inner if part):
            continue
        if test.examples and test.filename == module.__file__:
            tests.append(test)  # Only docstrings defined in this module.
    return tests


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)  # An example that writes a file writes here.
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    with warnings.catch_warnings():
        # Examples may warn (GPUMemoryCallback falls back to host memory
        # without an accelerator); only their printed results count.
        warnings.simplefilter("ignore")
        for test in public_examples(module):
            runner.run(test, out=report.write)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, report.getvalue()
