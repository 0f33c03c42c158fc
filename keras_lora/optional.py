"""Optional dependencies: import one, or say in one line which extra brings it.

    matplotlib = require("matplotlib", extra="bench")

A user who installed `keras-lora[jax]` and runs a command that draws charts
gets `MissingExtra`, whose message is the one line the command prints:
`keras-lora: this needs matplotlib; install it with pip install
"keras-lora[bench]"`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtra", "require"]


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra.

    Attributes:
        module: the module that could not be imported (e.g. "matplotlib").
        extra: the keras-lora extra that installs it (e.g. "bench").
    """

    def __init__(self, module: str, extra: str):
        self.module = module
        self.extra = extra
        top = module.split(".")[0]
        super().__init__(
            f"keras-lora: this needs {top}; install it with "
            f'pip install "keras-lora[{extra}]"',
            name=top,
        )


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise `MissingExtra` naming the extra to install.

    Args:
        module: a module name, dotted or not (e.g. "matplotlib.pyplot").
        extra: the keras-lora extra that installs it (e.g. "bench").

    Returns:
        The imported module.

    Raises:
        MissingExtra: when the module (or its top package) is not installed.

    Example:

    >>> require("json", extra="bench").__name__
    'json'
    >>> try:
    ...     require("nosuchmod", extra="bench")
    ... except MissingExtra as error:
    ...     print(error)
    keras-lora: this needs nosuchmod; install it with pip install "keras-lora[bench]"
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        if error.name is not None and error.name.split(".")[0] != top:
            raise  # The module is there; something it imports is broken.
        raise MissingExtra(module, extra) from None
