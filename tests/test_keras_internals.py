"""Private Keras (and keras-hub) names are used in one package only,
`keras_lora/_keras_internals/`, so a Keras upgrade has one place to look.

Read from the source (ast) of every module of the package, outside that
one, this fails on:

- an import of `keras.src` or `keras_hub.src` (or a `keras.src...`
  attribute chain or module string);
- a private attribute (`x._name`, `getattr(x, "_name")`, `setattr`,
  `hasattr`, `delattr`, `object.__setattr__`, `vars(x)["_name"]`,
  `"_name" in vars(x)`, `x.__dict__...`), except keras_lora's own: on
  `self`/`cls` (or a keras_lora class or module by name) for a name that
  keras_lora class or module defines or assigns itself and that no class
  of another library in the class's bases uses (so `self._parent_path` on
  a `keras.layers.Layer` subclass counts as Keras's), and our marker
  attributes (`_keras_lora_...`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pathlib
import re
import sys
import types

import pytest

PACKAGE = "keras_lora"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
DOOR = f"{PACKAGE}._keras_internals"
MARKER = "_keras_lora_"
PRIVATE_MODULES = ("keras.src", "keras_hub.src")
NAME_ARGUMENT_CALLS = {"getattr", "setattr", "hasattr", "delattr"}
OBJECT_CALLS = {"__setattr__", "__getattribute__", "__delattr__"}
# Private attributes of libraries other than Keras and keras-hub, which the
# door does not cover: (module, name) -> why it is read.
OTHER_LIBRARIES = {
    (f"{PACKAGE}.bench.peft_run", "_attn_implementation"): (
        "transformers' config names its attention implementation only "
        "there; the benchmark records it"
    ),
}


@dataclasses.dataclass(frozen=True)
class Finding:
    module: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.what}"


def is_private(name: str) -> bool:
    return (
        name.startswith("_")
        and not name.startswith("__")
        and not name.startswith(MARKER)
        and name.strip("_") != ""
    )


def is_private_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in PRIVATE_MODULES)


def owned_names(tree: ast.Module) -> tuple[set[str], dict[str, set[str]]]:
    """Names the module defines at its top level, and for each class (by
    qualified name) the names its body defines or its methods assign on
    `self`/`cls`."""
    module_names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            module_names.add(node.name)
        for target in _assigned(node):
            if isinstance(target, ast.Name):
                module_names.add(target.id)
    classes: dict[str, set[str]] = {}

    def visit_class(node: ast.ClassDef, prefix: str) -> None:
        qualname = prefix + node.name
        names = classes.setdefault(qualname, set())
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(item.name)
                if item.args.args:
                    receiver = item.args.args[0].arg
                    for sub in ast.walk(item):
                        for target in _assigned(sub):
                            if (
                                isinstance(target, ast.Attribute)
                                and isinstance(target.value, ast.Name)
                                and target.value.id == receiver
                            ):
                                names.add(target.attr)
            elif isinstance(item, ast.ClassDef):
                names.add(item.name)
                visit_class(item, qualname + ".")
            for target in _assigned(item):
                if isinstance(target, ast.Name):
                    names.add(target.id)

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node in tree.body:
            visit_class(node, "")
    return module_names, classes


def _assigned(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        targets = []
        for target in node.targets:
            targets.extend(
                target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
            )
        return targets
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


class _Sources:
    """Each module's source and owned names, read once."""

    def __init__(self):
        self.trees: dict[str, ast.Module] = {}
        self.owned: dict[str, tuple[set[str], dict[str, set[str]]]] = {}
        self.foreign_text: dict[str, str] = {}

    def add(self, module: str, tree: ast.Module) -> None:
        self.trees[module] = tree
        self.owned[module] = owned_names(tree)

    def owns(self, klass: type, name: str) -> bool:
        """Whether a keras_lora class in `klass`'s bases defines or assigns
        `name`, and no other library's class in them uses it."""
        ours = False
        for base in klass.__mro__:
            module = getattr(base, "__module__", "")
            if base is object:
                continue
            if module in self.owned:
                classes = self.owned[module][1]
                if name in classes.get(base.__qualname__, ()):
                    ours = True
            elif self._foreign_uses(base, name):
                return False
        return ours

    def _foreign_uses(self, base: type, name: str) -> bool:
        if name in vars(base):
            return True
        module = sys.modules.get(base.__module__)
        if module is None:
            return False
        key = base.__module__
        if key not in self.foreign_text:
            try:
                self.foreign_text[key] = inspect.getsource(module)
            except (OSError, TypeError):
                self.foreign_text[key] = ""
        return re.search(rf"\b{re.escape(name)}\b", self.foreign_text[key]) is not None


def check_module(
    module: str, tree: ast.Module, namespace: dict, sources: _Sources
) -> list[Finding]:
    """Every use of a private Keras name in one module's source."""
    findings = []

    def add(node: ast.AST, what: str) -> None:
        findings.append(Finding(module, node.lineno, what))

    def resolve(expr: ast.expr, receivers: dict[str, type]) -> object:
        if isinstance(expr, ast.Name):
            if expr.id in receivers:
                return receivers[expr.id]
            return namespace.get(expr.id)
        return None

    def access(node: ast.AST, base: ast.expr, name: str, receivers) -> None:
        if not is_private(name):
            return
        if (module, name) in OTHER_LIBRARIES:
            return
        target = resolve(base, receivers)
        if isinstance(target, type) and target.__module__ in sources.owned:
            if sources.owns(target, name):
                return
        if isinstance(target, types.ModuleType) and target.__name__ in sources.owned:
            if name in sources.owned[target.__name__][0]:
                return
        add(node, f"private attribute {ast.unparse(base)}.{name}")

    def name_string(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return expr.value
        return None

    def dict_of(expr: ast.expr) -> ast.expr | None:
        """`x` for `vars(x)` or `x.__dict__`."""
        if (
            isinstance(expr, ast.Call)
            and isinstance(expr.func, ast.Name)
            and expr.func.id == "vars"
            and len(expr.args) == 1
        ):
            return expr.args[0]
        if isinstance(expr, ast.Attribute) and expr.attr == "__dict__":
            return expr.value
        return None

    def visit(node: ast.AST, receivers: dict[str, type], klass: type | None):
        if isinstance(node, ast.ClassDef):
            found = namespace.get(node.name) if klass is None else None
            if klass is not None:
                found = vars(klass).get(node.name)
            klass_here = found if isinstance(found, type) else None
            for child in node.body:
                visit(child, receivers, klass_here)
            for child in node.decorator_list + node.bases + node.keywords:
                visit(child, receivers, klass)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = dict(receivers)
            if klass is not None and node.args.args:
                inner[node.args.args[0].arg] = klass
            for child in ast.iter_child_nodes(node):
                visit(child, inner, None)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_private_module(alias.name):
                    add(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            names = [f"{source}.{a.name}" for a in node.names]
            if is_private_module(source) or any(map(is_private_module, names)):
                add(node, f"from {source} import ...")
        elif isinstance(node, ast.Attribute):
            if node.attr == "src" and is_private_module(ast.unparse(node)):
                add(node, f"attribute chain {ast.unparse(node)}")
            access(node, node.value, node.attr, receivers)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if any(node.value.startswith(m + ".") for m in PRIVATE_MODULES):
                add(node, f"module string {node.value!r}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = name_string(node.args[1]) if len(node.args) > 1 else None
            if isinstance(func, ast.Name) and func.id in NAME_ARGUMENT_CALLS:
                if name is not None:
                    access(node, node.args[0], name, receivers)
            elif (
                isinstance(func, ast.Attribute)
                and func.attr in OBJECT_CALLS
                and isinstance(func.value, ast.Name)
                and func.value.id == "object"
                and name is not None
            ):
                access(node, node.args[0], name, receivers)
            elif (
                isinstance(func, ast.Attribute)
                and func.attr in ("get", "pop", "setdefault")
                and node.args
                and dict_of(func.value) is not None
            ):
                key = name_string(node.args[0])
                if key is not None:
                    access(node, dict_of(func.value), key, receivers)
        elif isinstance(node, ast.Subscript) and dict_of(node.value) is not None:
            key = name_string(node.slice)
            if key is not None:
                access(node, dict_of(node.value), key, receivers)
        elif isinstance(node, ast.Compare):
            key = name_string(node.left)
            for op, right in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, (ast.In, ast.NotIn)) and key is not None:
                    if dict_of(right) is not None:
                        access(node, dict_of(right), key, receivers)
        for child in ast.iter_child_nodes(node):
            visit(child, receivers, klass)

    for node in tree.body:
        visit(node, {}, None)
    return findings


def package_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


@pytest.fixture(scope="module")
def package_sources() -> _Sources:
    sources = _Sources()
    for module, path in package_modules().items():
        sources.add(module, ast.parse(path.read_text(), str(path)))
    return sources


def in_door(module: str) -> bool:
    """Whether `module` is the door package or one of its modules."""
    return module == DOOR or module.startswith(DOOR + ".")


def check_package(sources: _Sources) -> list[Finding]:
    findings = []
    for module, tree in sources.trees.items():
        if in_door(module):
            continue
        # A `__main__` module runs when imported; it defines no class.
        namespace = {} if module.endswith("__main__") else None
        if namespace is None:
            namespace = vars(importlib.import_module(module))
        findings.extend(check_module(module, tree, namespace, sources))
    return findings


def test_only_the_door_uses_private_keras_names(package_sources):
    findings = check_package(package_sources)
    assert not findings, (
        "Private Keras names outside keras_lora/_keras_internals/ (add a "
        "named function there and call it):\n" + "\n".join(map(str, findings))
    )


def check_snippet(source: str, package_sources: _Sources) -> list[str]:
    """The findings in `source`, run as module `keras_lora._snippet`."""
    module = f"{PACKAGE}._snippet"
    tree = ast.parse(source)
    namespace = {"__name__": module}
    exec(compile(tree, module, "exec"), namespace)
    sources = _Sources()
    sources.owned = dict(package_sources.owned)
    sources.add(module, tree)
    return [f.what for f in check_module(module, tree, namespace, sources)]


@pytest.mark.parametrize(
    "source, found",
    [
        ("def f():\n    import keras.src.backend", ["import keras.src.backend"]),
        ("def f():\n    from keras.src.backend import Variable", ["from keras.src"]),
        ("def f():\n    from keras import src", ["from keras import"]),
        ("import keras\nx = lambda: keras.src.ops", ["attribute chain keras.src"]),
        ("def f(importlib):\n    importlib.import_module('keras_hub.src.x')", ["mod"]),
        ("def f(layer):\n    return layer._layers", ["layer._layers"]),
        ("def f(layer):\n    return getattr(layer, '_tracker', None)", ["_tracker"]),
        ("def f(layer):\n    return hasattr(layer, '_nodes')", ["_nodes"]),
        ("def f(layer):\n    object.__setattr__(layer, '_int8_call', 1)", ["_int8"]),
        ("def f(layer):\n    return vars(layer).get('_nodes')", ["_nodes"]),
        ("def f(layer):\n    return '_torch_params' in vars(layer)", ["_torch"]),
        ("def f(layer):\n    return layer.__dict__['_layers']", ["_layers"]),
        # Keras's private attribute set on our own Layer subclass.
        (
            "import keras\nclass L(keras.layers.Layer):\n"
            "    def __init__(self):\n        super().__init__()\n"
            "        self._parent_path = 'a'\n",
            ["self._parent_path"],
        ),
        # Read on self, never assigned by our class: the base's.
        (
            "import keras\nclass O(keras.optimizers.SGD):\n"
            "    def f(self):\n        return self._iterations\n",
            ["self._iterations"],
        ),
        # Our own: assigned by the class, or defined by it, or our marker.
        (
            "class C:\n    def __init__(self):\n        self._mine = 1\n"
            "    def _helper(self):\n        return self._mine + C._helper2()\n"
            "    @staticmethod\n    def _helper2():\n        return 1\n",
            [],
        ),
        ("def f(layer):\n    return getattr(layer, '_keras_lora_flag', False)", []),
        ("from keras_lora import quantized\nx = quantized._set_straight_through", []),
        (
            "from keras_lora import quantized\ndef f():\n"
            "    return quantized._no_such_name",
            ["quantized._no_such_name"],
        ),
    ],
)
def test_the_check_finds_private_keras_names(source, found, package_sources):
    findings = check_snippet(source, package_sources)
    assert len(findings) == len(found), findings
    for what, expected in zip(findings, found, strict=True):
        assert expected in what


def door_functions() -> list:
    """The public functions of every module of the door, each once."""
    found = {}
    for module in package_modules():
        if not in_door(module):
            continue
        for name, value in vars(importlib.import_module(module)).items():
            if (
                inspect.isfunction(value)
                and in_door(value.__module__)
                and not name.startswith("_")
            ):
                found[value.__qualname__, value.__module__] = value
    return list(found.values())


def test_each_door_function_says_what_it_relies_on():
    functions = door_functions()
    assert len(functions) >= 20
    for function in functions:
        doc = inspect.getdoc(function)
        assert doc, f"{function.__name__} has no docstring"
        # Which Keras it was checked against ("Keras 3.0 to 3.16.dev").
        assert re.search(r"\b3\.\d+", doc), f"{function.__name__}: no version"
        parameters = inspect.signature(function).parameters
        if parameters:
            assert "Args:" in doc, f"{function.__name__}: no Args section"
            for name in parameters:
                assert f"{name}:" in doc, f"{function.__name__}: `{name}` undocumented"
