"""Griffe extension: keras-lora's `Example:` sections as Google-style
sections, and `LoraSettings` defaults shown as their values.

The docstrings write their doctests at the section's own indentation:

    Example:

    >>> inject_lora(model)

Google style reads a section's content from the indented lines below its
title, so this indents everything from `Example:` to the next section
title or the end; the doctests then render as code blocks. Used by
mkdocstrings (mkdocs.yml, `extensions:`); the source is not changed.

Signatures take their defaults from `LoraSettings` (`rank: int =
LoraSettings.rank`), which says where the default lives but not what it
is; the reference shows the value (`rank: int = 4`).
"""

from __future__ import annotations

import dataclasses
import re

import griffe

from keras_lora.settings import LoraSettings

_SETTING_DEFAULTS = {
    f"LoraSettings.{field.name}": repr(field.default)
    for field in dataclasses.fields(LoraSettings)
}

_TITLE = re.compile(r"^(?:Example|Examples)(?: \((.*)\))?:\s*$")
_SECTION = re.compile(
    r"^(Args|Arguments|Returns|Yields|Raises|Attributes|Note|Notes|Warning|"
    r"Warnings|See Also|References|Example|Examples|Methods):\s*$"
)


def indent_examples(text: str) -> str:
    """`text` with the lines of each `Example:` section indented by 4."""
    out, inside = [], False
    for line in text.split("\n"):
        title = _TITLE.match(line)
        if title:
            inside = True
            out.append("Examples:")
            if title.group(1):
                out += [f"    {title.group(1).capitalize()}:", ""]
            continue
        if inside and _SECTION.match(line):
            inside = False
        if inside and line:
            line = "    " + line
        out.append(line)
    return "\n".join(out)


class DoctestExamples(griffe.Extension):
    """Rewrites the docstring of every object griffe loads."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None and "Example" in obj.docstring.value:
            obj.docstring.value = indent_examples(obj.docstring.value)
        if obj.is_function:
            for parameter in obj.parameters:
                value = _SETTING_DEFAULTS.get(str(parameter.default))
                if value is not None:
                    parameter.default = value
