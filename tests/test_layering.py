"""The package's imports run one way: cli -> recipes/bench -> interop ->
families -> core, with no cycle, and core never imports keras_hub. Layer
and Hugging Face names live in the family modules.

The import graph is read from the source (ast), so an import inside a
function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "keras_lora"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
TESTS = pathlib.Path(__file__).resolve().parent
# A module longer than this holds more than one concept: split it.
MAX_LINES = 500
# Subpackages above the core, and who may import whom among them.
FAMILIES, INTEROP, CLI = "families", "interop", "cli"
RECIPES, BENCH = "recipes", "bench"
UPPER = {FAMILIES, INTEROP, RECIPES, BENCH, CLI}
# Facts about GPT-2 that belong to keras_lora/families/gpt2.py alone.
GPT2_NAMES = (
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
    "attn.c_attn",
    "attn.c_proj",
    "mlp.c_fc",
    "mlp.c_proj",
)
GPT2_MODULE = "keras_lora.families.gpt2"
# The modules that hold one family's (or a group of families') data; not the
# `Family` definition, the layout builder or the package's __init__.
FAMILY_DATA_MODULES = {
    f"{PACKAGE}.{FAMILIES}.{path.stem}"
    for path in (ROOT / FAMILIES).glob("*.py")
    if path.stem not in ("__init__", "family", "layout")
}


def module_files(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Module name -> file, for every .py under the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_source(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a `from ... import` reads, from inside `package`."""
    if not node.level:
        return node.module
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: pathlib.Path, modules) -> set[str]:
    """Every module `name` imports: package modules by their name, outside
    ones by their top-level name ("keras_hub")."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            # The longest package module that `target` names.
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            found.add(target)
        else:
            found.add(target.split(".")[0])

    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = import_source(node, package)
            for alias in node.names:
                # `from pkg import submodule` imports the submodule.
                candidate = f"{source}.{alias.name}"
                add(candidate if candidate in modules else source)
    found.discard(name)
    return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def internal(graph) -> dict[str, set[str]]:
    return {m: {t for t in targets if t in graph} for m, targets in graph.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph as a path [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


# keras-hub's internals (the door's keras-hub part) import keras_hub, so
# they sit at the interop tier: only interop and above use them.
HUB_DOOR = f"{PACKAGE}._keras_internals.hub"


def tier(module: str) -> str:
    """ "core", a subpackage name from UPPER, or "package" (the __init__)."""
    if module == PACKAGE:
        return "package"
    if module == HUB_DOOR:
        return INTEROP
    part = module.split(".")[1]
    return part if part in UPPER else "core"


# Which tiers each tier may import (besides itself and outside packages).
ALLOWED = {
    "core": {"core"},
    FAMILIES: {"core", FAMILIES},
    INTEROP: {"core", FAMILIES, INTEROP},
    # The package's public API (core, interop and families re-exported) is
    # below recipes and bench, and never imports them back.
    RECIPES: {"core", FAMILIES, INTEROP, RECIPES, BENCH, "package"},
    BENCH: {"core", FAMILIES, INTEROP, RECIPES, BENCH, "package"},
    CLI: {"core", FAMILIES, INTEROP, RECIPES, BENCH, CLI, "package"},
    "package": {"core", FAMILIES, INTEROP},
}


def layering_violations(graph) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        own = tier(module)
        for target in sorted(targets):
            if target in graph:
                if tier(target) not in ALLOWED[own]:
                    problems.append(f"{module} ({own}) imports {target}")
            elif target == "keras_hub" and own == "core":
                problems.append(f"{module} (core) imports keras_hub")
    return problems


GRAPH = import_graph()


def test_graph_reads_the_known_edges():
    """The parser itself: edges this package is known to have."""
    assert "keras_lora.kernel_split" in GRAPH["keras_lora.layer"]
    assert {"keras_lora.layer", "keras_lora.surgery"} <= GRAPH["keras_lora.injection"]
    assert "keras_lora.files" in GRAPH["keras_lora.saving"]
    assert "keras" in GRAPH["keras_lora.saving"]
    assert "keras_lora.families.gpt2" in GRAPH["keras_lora.families"]
    assert "keras_lora.families.family" in GRAPH["keras_lora.families.gpt2"]


def test_parser_on_a_made_up_package(tmp_path):
    """Relative, function-level and `from pkg import submodule` imports, and
    a cycle and a layering breach it must report."""
    root = tmp_path / PACKAGE
    (root / FAMILIES).mkdir(parents=True)
    (root / "__init__.py").write_text("from keras_lora.core_a import f\n")
    (root / "core_a.py").write_text(
        "def f():\n    from .core_b import g\n    import keras_hub\n    return g\n"
    )
    (root / "core_b.py").write_text("from keras_lora import core_a\n")
    (root / FAMILIES / "__init__.py").write_text("from . import fam\n")
    (root / FAMILIES / "fam.py").write_text("from ..core_a import f\n")
    (root / "core_c.py").write_text("from keras_lora.families.fam import x\n")
    graph = import_graph(root)
    assert graph["keras_lora.core_a"] == {"keras_lora.core_b", "keras_hub"}
    assert graph["keras_lora.core_b"] == {"keras_lora.core_a"}
    assert graph["keras_lora.families"] == {"keras_lora.families.fam"}
    assert graph["keras_lora.families.fam"] == {"keras_lora.core_a"}
    cycle = find_cycle(internal(graph))
    assert cycle == ["keras_lora.core_a", "keras_lora.core_b", "keras_lora.core_a"]
    assert layering_violations(graph) == [
        "keras_lora.core_a (core) imports keras_hub",
        "keras_lora.core_c (core) imports keras_lora.families.fam",
    ]


def test_no_import_cycle():
    cycle = find_cycle(internal(GRAPH))
    assert cycle is None, " -> ".join(cycle)


def test_imports_run_one_way():
    assert layering_violations(GRAPH) == []


@pytest.mark.parametrize("name", GPT2_NAMES)
def test_projection_names_live_in_family_modules(name):
    """Layer and Hugging Face names are family data: they appear in the
    family modules only (Llama-style decoders share keras-hub's
    feed-forward layer names with GPT-2), never in the code that reads
    them."""
    holders = [
        module
        for module, path in module_files().items()
        if name in path.read_text("utf-8")
    ]
    assert GPT2_MODULE in holders
    assert set(holders) <= FAMILY_DATA_MODULES, (
        f"{name!r} appears in {holders}; read it from keras_lora.families"
    )


def long_modules(root: pathlib.Path = ROOT, limit: int = MAX_LINES) -> list[str]:
    """The package's modules over `limit` lines, with their length."""
    found = []
    for name, path in module_files(root).items():
        lines = len(path.read_text("utf-8").splitlines())
        if lines > limit:
            found.append(f"{name}: {lines} lines")
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(root: pathlib.Path = ROOT) -> list[str]:
    """Private names (`_x`) of one package module used in another: imported
    (`from keras_lora.a import _x`) or read off the module (`a._x`,
    `keras_lora.a._x`). A private module itself (`keras_lora._m`) may be
    imported; its public names are its interface."""
    modules = module_files(root)
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        bound = {}  # Local name -> the package module it is bound to.
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        local = alias.asname or alias.name.split(".")[0]
                        bound[local] = alias.name if alias.asname else local
            elif isinstance(node, ast.ImportFrom):
                source = import_source(node, package)
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        bound[alias.asname or alias.name] = f"{source}.{alias.name}"
                    elif (
                        source in modules and source != name and is_private(alias.name)
                    ):
                        found.append(f"{name} imports {source}.{alias.name}")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
                continue
            parts, value = [], node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                target = ".".join([bound[value.id], *reversed(parts)])
                if target in modules and target != name:
                    found.append(f"{name} uses {target}.{node.attr}")
    return sorted(found)


def imported_test_files(tests: pathlib.Path = TESTS) -> list[str]:
    """Test files (`test_*.py`) that another file of the suite imports;
    what tests share lives in tests/helpers.py (or another helper module)
    and tests/conftest.py."""
    test_modules = {path.stem for path in tests.glob("test_*.py")}
    found = []
    for path in sorted(tests.glob("*.py")):
        tree = ast.parse(path.read_text("utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = import_source(node, tests.name) if node.level else node.module
                names = [source, *(f"{source}.{alias.name}" for alias in node.names)]
            else:
                continue
            for imported in names:
                stem = imported.removeprefix(tests.name + ".")
                if stem in test_modules:
                    found.append(f"{path.name} imports {imported}")
    return sorted(set(found))


def test_no_module_is_over_the_line_limit():
    assert long_modules() == []


def test_no_module_uses_another_modules_private_names():
    """A helper another module needs is public (no underscore, a
    docstring) in the module that owns its concept."""
    assert private_uses() == []


def test_no_test_file_imports_another():
    assert imported_test_files() == []


def test_checks_on_a_made_up_package(tmp_path):
    """Each check reports what it must, and leaves alone what it may."""
    root = tmp_path / PACKAGE
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from keras_lora import _private_module\n")
    (root / "_private_module.py").write_text("def helper():\n    pass\n")
    (root / "a.py").write_text("def _f():\n    pass\n\n\nX = _f\n")
    (root / "b.py").write_text("from keras_lora.a import _f\n")
    (root / "c.py").write_text("from keras_lora import a\n\na._f()\na.__name__\n")
    (root / "d.py").write_text(
        "import keras_lora.a as m\nimport keras_lora.a\n\nm._g\nkeras_lora.a._h\n"
    )
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "e.py").write_text(
        "from ..a import _f\nfrom .. import a\n"
        "from keras_lora._private_module import helper\n"
    )
    (root / "sub" / "long.py").write_text("x = 1\n" * 501)
    assert private_uses(root) == [
        "keras_lora.b imports keras_lora.a._f",
        "keras_lora.c uses keras_lora.a._f",
        "keras_lora.d uses keras_lora.a._g",
        "keras_lora.d uses keras_lora.a._h",
        "keras_lora.sub.e imports keras_lora.a._f",
    ]
    assert long_modules(root) == ["keras_lora.sub.long: 501 lines"]
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "helpers.py").write_text("X = 1\n")
    (tests / "test_a.py").write_text("from tests.helpers import X\n")
    (tests / "test_b.py").write_text("from tests.test_a import X\n")
    (tests / "test_c.py").write_text("def f():\n    from tests import test_a\n")
    (tests / "test_d.py").write_text("import tests.test_b\nfrom . import test_c\n")
    assert imported_test_files(tests) == [
        "test_b.py imports tests.test_a",
        "test_c.py imports tests.test_a",
        "test_d.py imports tests.test_b",
        "test_d.py imports tests.test_c",
    ]
