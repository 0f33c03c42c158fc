"""The README stays short and the documentation site covers the API.

The site itself is built by `.ci/run` (`mkdocs build --strict`); these
checks run on every backend without MkDocs.
"""

from __future__ import annotations

import importlib.util
import os
import re

import keras_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gen_pages():
    spec = importlib.util.spec_from_file_location(
        "gen_pages", os.path.join(ROOT, "docs", "gen_pages.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_at_most_250_lines():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 250


def test_readme_links_point_at_files_of_the_checkout():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert targets
    for target in targets:
        if "://" not in target:
            assert os.path.exists(os.path.join(ROOT, target)), target


def test_every_public_name_has_an_api_entry():
    pages = _gen_pages().api_pages()
    entries = "\n".join(text for path, text in pages.items() if path != "api/index.md")
    for name in keras_lora.__all__:
        assert f"::: keras_lora.{name}\n" in entries, name
        assert f"[`{name}`]" in pages["api/index.md"], name


def test_the_command_line_page_lists_every_subcommand():
    from keras_lora.cli import build_parser

    page = _gen_pages().cli_page()
    parser = build_parser()
    (sub,) = [a for a in parser._actions if hasattr(a, "choices") and a.choices]
    for name in sub.choices:
        assert f"## `keras-lora {name}`" in page, name


def test_every_module_is_in_the_layout_list():
    lines = "\n".join(_gen_pages().layout_lines())
    for folder, _, files in os.walk(os.path.join(ROOT, "keras_lora")):
        for file in files:
            if file.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, file), ROOT)
                assert f"`{rel}`" in lines, rel


def test_every_results_file_has_a_benchmark_page():
    pages, assets = _gen_pages().benchmark_pages()
    results = os.path.join(ROOT, "benchmarks", "results")
    for folder, dirs, files in os.walk(results):
        dirs[:] = [d for d in dirs if d != "runs"]
        for file in files:
            if file == "results.json" or file.endswith(".png"):
                path = os.path.join(folder, file)
                assert path in assets.values(), path
    assert all(text.strip() for text in pages.values())
