"""Chat templates: found in a model directory, rendered as transformers does.

transformers 5 saves a tokenizer's template as `chat_template.jinja` beside
`tokenizer.json`; older versions store it as `"chat_template"` in
`tokenizer_config.json` (a string, or a list of named templates of which
"default" is used). The renderer below copies transformers'
`utils/chat_template_utils.py` (5.x): an `ImmutableSandboxedEnvironment`
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
`{% generation %}` tag, a `tojson` filter that does not escape HTML, and the
globals `raise_exception`, `strftime_now`, `dict` and `namespace`; the
template sees `messages`, `tools`, `documents`, `add_generation_prompt` and
the tokenizer's named special tokens (`bos_token`, `eos_token`, ...). The
same template and messages give the same text as `apply_chat_template`,
so the token ids match too.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatTemplate",
    "MissingChatTemplate",
    "chat_template_origin",
    "find_chat_template",
]

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
# Names a message's reasoning is passed under; templates read the first
# (transformers' `_REASONING_FIELDS`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class MissingChatTemplate(ValueError):
    """Conversational data for a model without a chat template."""


def find_chat_template(model_dir: str, override: str | None = None) -> str | None:
    """The chat template of a model directory, as text.

    Args:
        model_dir: a Hugging Face model (or tokenizer) directory.
        override: a template file that wins over the directory's.

    Returns:
        The template, or None when the directory has none.

    Raises:
        FileNotFoundError: if `override` does not exist.
        ValueError: if `tokenizer_config.json` is not valid JSON.

    Example:

    >>> import tempfile
    >>> find_chat_template(tempfile.mkdtemp()) is None
    True
    """
    if override is not None:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"no chat template file {override}")
        with open(override, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(model_dir, TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    config = read_tokenizer_config(model_dir)
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: transformers uses "default" for chat.
        named = {item.get("name"): item.get("template") for item in template}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def chat_template_origin(model_dir: str, override: str | None = None) -> str | None:
    """Where `find_chat_template` takes the template from (for reports).

    Args:
        model_dir: the model directory.
        override: the `--chat-template` file, if any.

    Returns:
        The override path, "chat_template.jinja", "tokenizer_config.json",
        or None when there is no template.

    Example:

    >>> import tempfile
    >>> chat_template_origin(tempfile.mkdtemp(), "mine.jinja")
    'mine.jinja'
    """
    if override is not None:
        return override
    if os.path.isfile(os.path.join(model_dir, TEMPLATE_FILE)):
        return TEMPLATE_FILE
    if find_chat_template(model_dir) is not None:
        return CONFIG_FILE
    return None


def read_tokenizer_config(model_dir: str) -> dict[str, Any]:
    """`tokenizer_config.json` of a directory ({} when there is none)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg})") from None


class ChatTemplate:
    """A compiled chat template that renders messages as transformers does.

    Args:
        source: the Jinja template text.
        special_tokens: the tokenizer's named special tokens
            (`{"bos_token": "<s>", ...}`), visible to the template.

    Example:

    >>> t = ChatTemplate("{% for m in messages %}[{{ m.role }}] {{ m.content }}\\n"
    ...                  "{% endfor %}{% if add_generation_prompt %}[assistant] "
    ...                  "{% endif %}")
    >>> t.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    '[user] hi\\n[assistant] '
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        """The rendered conversation.

        Args:
            messages: `{"role", "content"}` dicts (other keys pass through).
            add_generation_prompt: end with the header that starts an
                assistant turn.

        Returns:
            The text transformers' `apply_chat_template(..., tokenize=False)`
            returns for the same template, messages and special tokens.

        Raises:
            ValueError: when the template fails or calls `raise_exception`
                (e.g. roles that do not alternate).
        """
        chat = _alias_reasoning_fields(
            [{k: v for k, v in m.items() if v is not None} for m in messages]
        )
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"the chat template failed: {error}") from None


def _alias_reasoning_fields(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill `reasoning_content` (and `thinking`) from any of the reasoning
    names, as transformers does before rendering."""
    aliased = []
    for message in chat:
        reasoning = next(
            (message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body: templates
    written for transformers' assistant masks must still render here (the
    masks themselves come from rendering prefixes, see `encode`)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(
            self.call_method("_render"), [], [], body
        ).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own filter escapes HTML characters; transformers' does not.
    return json.dumps(
        x,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # A callable `dict` without attribute access to the real type (sandbox).
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces refuse underscore names so templates cannot reach internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore names on a namespace: {name!r}"
            )


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    """The template compiled in transformers' sandboxed environment."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ValueError(
            f"the chat template is not valid Jinja (line {error.lineno}: "
            f"{error.message})"
        ) from None
