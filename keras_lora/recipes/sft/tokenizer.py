"""The tokenizer a Hugging Face model directory comes with.

`tokenizer.json` is loaded with the `tokenizers` library, set up the way
transformers 5's `PreTrainedTokenizerFast` (`TokenizersBackend`) sets it
up, so the ids equal transformers':

- truncation and padding stored in the file are switched off (transformers
  switches them per call; keras-lora truncates after labelling, as TRL);
- the named special tokens (`bos_token`, `eos_token`, ...) come from
  `tokenizer_config.json` (then `special_tokens_map.json`), as a string or
  an `{"content": ...}` object; those missing from the vocabulary are added;
- the post-processor of `tokenizer.json` decides the BOS/EOS that plain
  text gets: transformers 5 ignores `add_bos_token` / `add_eos_token` in
  `tokenizer_config.json` when `tokenizer.json` exists, and so does this.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import AddedToken, Tokenizer

from keras_lora.recipes.sft.chat_template import (
    ChatTemplate,
    MissingChatTemplate,
    chat_template_origin,
    find_chat_template,
    read_tokenizer_config,
)
from keras_lora.recipes.sft.preset_tokenizer import (
    PresetTokenizer,
    is_keras_hub_preset,
    load_preset_tokenizer,
)

__all__ = [
    "SPECIAL_TOKEN_NAMES",
    "MissingChatTemplate",
    "ModelTokenizer",
    "load_tokenizer",
]

# transformers' SPECIAL_TOKENS_ATTRIBUTES: what templates see by name.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
TOKENIZER_FILE = "tokenizer.json"


class ModelTokenizer:
    """A model's tokenizer, its named special tokens and its chat template.

    Args:
        tokenizer: the `tokenizers.Tokenizer`.
        special_tokens: named special tokens, e.g. `{"eos_token": "</s>"}`.
        chat_template: the template text, or None.
        source: where it came from (for messages).
        template_origin: where the template comes from (for reports).

    Example:

    >>> tok = load_tokenizer("MODEL_DIR")  # doctest: +SKIP
    >>> tok.encode("Hello", add_special_tokens=False).ids  # doctest: +SKIP
    [9906]
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        special_tokens: dict[str, str],
        chat_template: str | None,
        source: str,
        template_origin: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.source = source
        self.template_origin = template_origin
        self.chat_template_source = chat_template
        self._template = None

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token (TRL appends it to plain strings)."""
        return self.special_tokens.get("eos_token")

    @property
    def template(self) -> ChatTemplate:
        """The compiled chat template.

        Raises:
            ValueError: when the model has none, saying how to give one.
        """
        if self._template is None:
            if self.chat_template_source is None:
                raise MissingChatTemplate(
                    f"{self.source} has no chat template (no chat_template.jinja "
                    'and no "chat_template" in tokenizer_config.json), and '
                    "conversational data needs one: give a Jinja template file "
                    "with --chat-template FILE"
                )
            self._template = ChatTemplate(
                self.chat_template_source, self.special_tokens
            )
        return self._template

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, None when the vocabulary lacks it."""
        return self.tokenizer.token_to_id(token)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens included."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def special_tokens_by_id(self) -> dict[int, str]:
        """id -> text of the vocabulary's special tokens (its added tokens
        marked special)."""
        added = self.tokenizer.get_added_tokens_decoder()
        return {index: token.content for index, token in added.items() if token.special}

    def encode(self, text: str, add_special_tokens: bool = True):
        """The `tokenizers.Encoding` of `text` (`.ids`, `.offsets`).

        Args:
            text: the text.
            add_special_tokens: apply the post-processor (e.g. a BOS), as
                transformers' `tokenizer(text)` does; chat-rendered text is
                encoded without (the template writes its own).
        """
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True):
        """`encode` for many texts at once (the Rust side runs them in
        parallel)."""
        return self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)


def load_tokenizer(
    model_dir: str, chat_template: str | None = None
) -> ModelTokenizer | PresetTokenizer:
    """Load the tokenizer and chat template of a Hugging Face directory, or
    of a keras-hub preset (`preset_tokenizer`).

    Args:
        model_dir: a directory with `tokenizer.json` (and usually
            `tokenizer_config.json`, `chat_template.jinja`), or a keras-hub
            preset name or `save_to_preset` directory.
        chat_template: a template file that overrides the directory's (or
            the preset's built-in one).

    Returns:
        The `ModelTokenizer` (a `PresetTokenizer` for a keras-hub preset).

    Raises:
        FileNotFoundError: if the directory or `tokenizer.json` is missing.
        ValueError: if a file is not valid JSON.

    Example:

    >>> load_tokenizer("/no/such/dir")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no model directory /no/such/dir
    """
    if is_keras_hub_preset(model_dir):
        return load_preset_tokenizer(model_dir, chat_template)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"no model directory {model_dir}")
    path = os.path.join(model_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{model_dir} has no {TOKENIZER_FILE}: give a Hugging Face model "
            "directory saved with a fast tokenizer"
        )
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception.
        raise ValueError(f"{path} is not a tokenizers file ({error})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    config = read_tokenizer_config(model_dir)
    special = _special_tokens(model_dir, config)
    missing = [t for t in special.values() if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing]
        )
    return ModelTokenizer(
        tokenizer,
        special,
        find_chat_template(model_dir, chat_template),
        model_dir,
        chat_template_origin(model_dir, chat_template),
    )


def _special_tokens(model_dir: str, config: dict[str, Any]) -> dict[str, str]:
    """Named special tokens from tokenizer_config.json, then
    special_tokens_map.json for those it lacks."""
    sources = [config]
    path = os.path.join(model_dir, "special_tokens_map.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                sources.append(json.load(f))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON ({error.msg})") from None
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        for source in sources:
            value = source.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
                break
    return special
