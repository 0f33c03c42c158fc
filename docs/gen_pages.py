"""MkDocs hook: the pages that are generated, so they cannot drift.

- `api/`: one page per module that defines a name of `keras_lora.__all__`,
  one `::: keras_lora.NAME` entry per name (mkdocstrings renders the
  docstring), and an index of every name.
- `guides/cli.md`: the help of `keras-lora` and each subcommand, from the
  argparse parser in `keras_lora.cli`.
- `benchmarks/`: one page per `results.json` (and per demo `*_quality.json`)
  under `benchmarks/results/`, rendered by the package's own report code,
  with the directory's plots and files; the notes beside the results
  (`*.md`) and `benchmarks/RESULTS.md` as archived pages.
- `contributing.md`: the `<!-- layout -->` marker becomes the list of
  modules, each with the first line of its docstring.

Listed in mkdocs.yml under `hooks:`; the functions that compute the lists
are plain Python (tests/test_docs.py calls them without MkDocs).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PACKAGE = os.path.join(ROOT, "keras_lora")
LAYOUT_MARKER = "<!-- layout -->"
BENCH_NAV_TITLES = {
    "speed": "Speed: keras-lora, PEFT, the floor",
    "speed_dropout0": "Speed, dropout 0",
    "speed_run1": "Speed, first run",
    "multi": "Mixed batches",
    "memory": "Memory",
    "forgetting": "Quality and forgetting (demo)",
}
HAND_WRITTEN = {
    "e2e.md": "E2E NLG BLEU (sft)",
    "packing.md": "Padding, buckets, packing (sft)",
    "quantized-load.md": "Quantized loading (sft --quantize)",
}


# ---------------------------------------------------------------- API


def api_modules() -> dict[str, list[str]]:
    """{defining module: [names of keras_lora.__all__ it defines]}, sorted."""
    import keras_lora

    groups: dict[str, list[str]] = {}
    for name in keras_lora.__all__:
        module = getattr(getattr(keras_lora, name), "__module__", "keras_lora")
        groups.setdefault(module, []).append(name)
    return {m: sorted(groups[m], key=str.lower) for m in sorted(groups)}


def api_pages() -> dict[str, str]:
    """{path under docs/: markdown} for the API reference."""
    groups = api_modules()
    pages = {}
    index = [
        "# API reference",
        "",
        "Every name that `import keras_lora` exports (`keras_lora.__all__`), "
        "rendered from its docstring. The list is generated from `__all__`.",
        "",
        "| name | module | summary |",
        "| --- | --- | --- |",
    ]
    import keras_lora

    for module, names in groups.items():
        short = module.removeprefix("keras_lora.")
        lines = [f"# `{short}`", ""]
        first = _first_line(_module_docstring(module))
        if first:
            lines += [first, ""]
        for name in names:
            lines += [f"::: keras_lora.{name}", ""]
            doc = (getattr(keras_lora, name).__doc__ or "").strip().split("\n")[0]
            index.append(
                f"| [`{name}`]({short}.md#keras_lora.{name}) | `{module}` | "
                f"{doc.replace('|', '/')} |"
            )
        pages[f"api/{short}.md"] = "\n".join(lines)
    index.sort(key=lambda line: line.lower() if line.startswith("| [") else "")
    pages["api/index.md"] = "\n".join(index) + "\n"
    return pages


def _module_docstring(module: str) -> str:
    path = _module_path(module)
    if path is None:
        return ""
    with open(path, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read())) or ""


def _module_path(module: str) -> str | None:
    rel = module.split(".")[1:]
    base = os.path.join(PACKAGE, *rel)
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(path):
            return path
    return None


def _first_line(doc: str) -> str:
    """A docstring's first paragraph as one line (its summary may wrap)."""
    paragraph = doc.strip().split("\n\n")[0] if doc else ""
    return " ".join(line.strip() for line in paragraph.splitlines())


# ---------------------------------------------------------------- CLI


def cli_page() -> str:
    """The command-line reference: `--help` of the command and subcommands."""
    os.environ["COLUMNS"] = "88"
    import argparse

    from keras_lora.cli import build_parser

    parser = build_parser()
    lines = [
        "# The command line",
        "",
        "`keras-lora COMMAND --help` prints each section below; this page is "
        "generated from the same argparse parser (`keras_lora.cli.build_parser`).",
        "Errors print one line on stderr: exit 2 for bad arguments, 1 otherwise "
        "(a missing optional dependency names the extra that installs it).",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                lines += [
                    f"## `keras-lora {name}`",
                    "",
                    "```text",
                    sub.format_help().rstrip(),
                    "```",
                    "",
                ]
    return "\n".join(lines)


# ---------------------------------------------------------------- layout


def layout_lines() -> list[str]:
    """One line per module of keras_lora: its path and docstring's summary."""
    rows = []
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("__", ".")))
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            with open(path, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
            rows.append(f"| `{rel}` | {_first_line(doc).replace('|', '/')} |")
    return ["| module | what it holds |", "| --- | --- |", *rows]


# ---------------------------------------------------------------- benchmarks


def _date(path: str) -> str:
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", path],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "not recorded"


def _machine(config: dict) -> str:
    machine = config.get("machine")
    if not machine:
        return "not recorded"
    if isinstance(machine, dict):
        return ", ".join(f"{k} {v}" for k, v in machine.items())
    return str(machine)


def _render_compare(data: dict) -> str:
    config = data["config"]
    if config.get("mode") == "mixed":
        from keras_lora.bench import mixed

        text = mixed.markdown(config, data["results"], data.get("ratios", []))
    else:
        from keras_lora.bench import report

        rows = data.get("ratios")
        if rows is None:
            rows = report.ratios(data["results"], config)
        text = report.markdown(config, data["results"], rows)
    lines = text.split("\n")
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    # The command is in the page's header.
    lines = [line for line in lines if not line.startswith("Command: `")]
    # The engine's own headings sit under the page title.
    return "\n".join("#" + line if line.startswith("#") else line for line in lines)


def _kept_images(text: str, folder: str) -> str:
    """Images the results folder does not hold become a note, not a link."""

    def replace(match):
        target = match.group(1)
        if os.path.exists(os.path.join(folder, target)):
            return match.group(0)
        return f"(the run's `{target}` is not kept with the results)"

    return re.sub(r"!\[[^\]]*\]\(([^)]+)\)", replace, text)


def _render_quality(data: dict) -> str:
    try:  # Where the report section lives after the recipes split.
        from keras_lora.recipes import quality_report as quality
    except ImportError:
        from keras_lora.recipes import quality

    return "\n".join(
        "#" + line if line.startswith("#") else line for line in quality.markdown(data)
    )


def benchmark_sources() -> list[tuple[str, str, str]]:
    """(kind, path of the JSON or note, page path under docs/), sorted."""
    found = []
    for folder, dirs, files in os.walk(RESULTS):
        dirs[:] = sorted(d for d in dirs if d != "runs")
        rel = os.path.relpath(folder, RESULTS).replace(os.sep, "/")
        page_dir = "benchmarks" if rel == "." else f"benchmarks/{rel}"
        for file in sorted(files):
            path = os.path.join(folder, file)
            if file == "results.json":
                found.append(("compare", path, f"{page_dir}/index.md"))
            elif file.endswith("_quality.json"):
                found.append(("quality", path, f"{page_dir}/{file[:-5]}.md"))
            elif file.endswith(".md") and file != "results.md":
                found.append(("note", path, f"{page_dir}/{file}"))
    found.append(
        ("note", os.path.join(ROOT, "benchmarks", "RESULTS.md"), "benchmarks/notes.md")
    )
    return sorted(found, key=lambda item: item[2])


def _title(page: str) -> str:
    if page == "benchmarks/notes.md":
        return "Benchmark notes (benchmarks/RESULTS.md)"
    parts = page.removeprefix("benchmarks/").split("/")
    if parts[-1] == "index.md":
        parts = parts[:-1]
    else:
        parts[-1] = parts[-1][:-3]
    if parts and parts[0] in BENCH_NAV_TITLES:
        parts[0] = BENCH_NAV_TITLES[parts[0]]
    return " / ".join(parts)


def benchmark_pages() -> tuple[dict[str, str], dict[str, str]]:
    """({page path: markdown}, {asset path under docs/: file to copy})."""
    pages, assets = {}, {}
    for kind, path, page in benchmark_sources():
        folder = os.path.dirname(path)
        page_dir = os.path.dirname(page)
        rel_source = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if kind == "note":
            with open(path, encoding="utf-8") as f:
                text = f.read()
            pages[page] = (
                f'!!! note "Archived notes"\n    `{rel_source}`, kept as '
                "written; the numbers are those of the runs it names.\n\n" + text
            )
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        config = data.get("config", data.get("settings", {})) or {}
        name = os.path.basename(path)
        assets[f"{page_dir}/{name}"] = path
        lines = [f"# {_title(page)}", ""]
        lines += [
            f"- Source: [`{rel_source}`]({name}) (the page is generated from it)",
            f"- Command: `{config.get('command', 'not recorded')}`",
            f"- Machine: {_machine(config)}",
            f"- Date (last commit of the file): {_date(path)}",
            "",
        ]
        if kind == "compare":
            body = _render_compare(data)
        else:
            body = _render_quality(data)
            lines.insert(2, f"Backend: {data.get('backend', 'not recorded')}.\n")
        body = _kept_images(body, folder)
        plots = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
        if kind == "compare" and plots:
            lines += ["## Plots", ""]
            for plot in plots:
                assets[f"{page_dir}/{plot}"] = os.path.join(folder, plot)
                lines += [f"[![{plot[:-4]}]({plot})]({plot})", ""]
        lines += [body, ""]
        others = sorted(
            f
            for f in os.listdir(folder)
            if f.endswith((".txt", ".py", ".sh"))
            and " " not in f
            and os.path.isfile(os.path.join(folder, f))
        )
        if kind == "compare" and others:
            lines += ["## Files beside the results", ""]
            for other in others:
                assets[f"{page_dir}/{other}"] = os.path.join(folder, other)
                lines.append(f"- [`{other}`]({other})")
            lines.append("")
        pages[page] = "\n".join(lines)
    kinds = {page: kind for kind, _, page in benchmark_sources()}
    index = [
        "# Benchmarks",
        "",
        "Each results page is generated from a results file under "
        "`benchmarks/results/` when the site is built: its command, machine, "
        "date, tables and plots. Notes pages are the prose written beside the "
        "runs, kept as written.",
        "",
        "| page | kind |",
        "| --- | --- |",
    ]
    if "benchmarks/index.md" in pages:  # A results.json at the top: none today.
        raise ValueError("benchmarks/results/results.json would hide the index")
    for page in sorted(pages):
        rel = page.removeprefix("benchmarks/")
        kind = "notes" if kinds[page] == "note" else "results"
        index.append(f"| [{_title(page)}]({rel}) | {kind} |")
    index += ["", "Measurement notes, kept as written:", ""]
    for name in sorted(os.listdir(os.path.join(ROOT, "docs", "benchmarks", "archive"))):
        if name.endswith(".md"):
            index.append(f"- [{name[:-3]}](archive/{name})")
    pages["benchmarks/index.md"] = "\n".join(index) + "\n"
    return pages, assets


def benchmark_nav(pages: dict[str, str]) -> list:
    """The Benchmarks section of the navigation, nested by directory."""
    tree: dict = {}
    for page in sorted(pages):
        if page == "benchmarks/index.md":
            continue
        parts = page.removeprefix("benchmarks/").split("/")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node.setdefault("", []).append(page)

    def build(node: dict, depth: int) -> list:
        items = []
        for page in node.get("", []):
            leaf = os.path.basename(page)
            if leaf == "index.md":
                items.insert(0, {"Results" if depth else "All": page})
            elif page == "benchmarks/notes.md":
                items.append({"Benchmark notes": page})
            else:
                items.append({leaf[:-3]: page})
        for key in sorted(k for k in node if k):
            title = BENCH_NAV_TITLES.get(key, key) if depth == 0 else key
            items.append({title: build(node[key], depth + 1)})
        return items

    archive = sorted(
        f"benchmarks/archive/{name}"
        for name in os.listdir(os.path.join(ROOT, "docs", "benchmarks", "archive"))
        if name.endswith(".md")
    )
    notes = [{_title(page).removeprefix("archive / "): page} for page in archive]
    # Pages written by hand beside the generated ones (docs/benchmarks/*.md).
    written = sorted(
        name
        for name in os.listdir(os.path.join(ROOT, "docs", "benchmarks"))
        if name.endswith(".md")
    )
    return [
        {"All benchmarks": "benchmarks/index.md"},
        *[
            {HAND_WRITTEN.get(name, name[:-3]): f"benchmarks/{name}"}
            for name in written
        ],
        *build(tree, 0),
        {"Measurement notes": notes},
    ]


# ---------------------------------------------------------------- MkDocs hooks

_GENERATED: dict = {}


def _generate() -> dict:
    if not _GENERATED:
        pages = {**api_pages(), "guides/cli.md": cli_page()}
        bench_pages, assets = benchmark_pages()
        pages.update(bench_pages)
        _GENERATED.update(pages=pages, assets=assets, bench=bench_pages)
    return _GENERATED


def on_config(config, **kwargs):
    generated = _generate()
    nav = config["nav"]
    for item in nav:
        if isinstance(item, dict) and "Benchmarks" in item:
            item["Benchmarks"] = benchmark_nav(generated["bench"])
        if isinstance(item, dict) and "API reference" in item:
            api = [{"Index": "api/index.md"}]
            api += [
                {page[4:-3]: page}
                for page in sorted(generated["pages"])
                if page.startswith("api/") and page != "api/index.md"
            ]
            item["API reference"] = api
    return config


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    generated = _generate()
    for path, text in generated["pages"].items():
        files.append(File.generated(config, path, content=text))
    for path, source in generated["assets"].items():
        files.append(File.generated(config, path, abs_src_path=source))
    return files


def on_page_markdown(markdown, page, config, files, **kwargs):
    if LAYOUT_MARKER in markdown:
        markdown = markdown.replace(LAYOUT_MARKER, "\n".join(layout_lines()))
    return markdown
