"""The tokenizer of a keras-hub preset, with the interface `encode` uses.

A keras-hub preset is a name (`gpt2_base_en`, `llama3_8b_en`), a handle
(`kaggle://...`, `hf://...`) or a local directory written by keras-hub's
`save_to_preset`. It carries a keras-hub tokenizer and no chat template.
`PresetTokenizer` gives it what the Hugging Face `ModelTokenizer` offers
`encode`: `encode_batch` (ids and character offsets), `token_to_id`,
`decode`, the named special tokens (from the keras-hub tokenizer's
`start_token`, `end_token` and `pad_token`) and a chat template: the
family's built-in one (`builtin_templates`) or `--chat-template FILE`.

Text is encoded as transformers encodes text with added tokens: the
tokenizer's special tokens (and the built-in template's turn markers) are
cut out first and map to their own ids; the text between them goes through
the preset's own model (byte-pair: keras-hub's `tokenize`; SentencePiece:
the preset's proto in the `sentencepiece` library keras-hub runs, which also
gives offsets). `add_special_tokens=True` puts the start token first where
the tokenizer has one, as keras-hub's `CausalLMPreprocessor` does (GPT-2's
`<|endoftext|>` included); chat-rendered text is encoded without (the
template writes its own).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from keras_lora.recipes.sft.builtin_templates import (
    BuiltinTemplate,
    template_for_tokenizer,
)
from keras_lora.recipes.sft.chat_template import ChatTemplate, MissingChatTemplate

__all__ = [
    "PresetTokenizer",
    "TokenizedText",
    "is_keras_hub_preset",
    "load_preset_tokenizer",
    "model_reference",
    "preset_load_error",
]


def is_keras_hub_preset(model: str) -> bool:
    """Whether `--model` names a keras-hub preset rather than a Hugging Face
    directory.

    A directory is a keras-hub preset when its `config.json` is a
    serialized Keras object (`registered_name`, as `save_to_preset` writes
    it); a handle with `://` or a bare name without a path separator that is
    not a local path is a preset name. Anything else is a path.

    Args:
        model: the `--model` value.

    Example:

    >>> is_keras_hub_preset("llama3_8b_en"), is_keras_hub_preset("./llama")
    (True, False)
    """
    if os.path.isdir(model):
        path = os.path.join(model, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                return "registered_name" in json.load(f)
        except (OSError, ValueError):
            return False
    if "://" in model:
        return True
    return not (os.path.exists(model) or "/" in model or os.sep in model)


def model_reference(model: str) -> str:
    """How exports name the base model: a local directory as an absolute
    path, a preset name as given.

    Example:

    >>> model_reference("gemma_2b_en")
    'gemma_2b_en'
    """
    return os.path.abspath(model) if os.path.exists(model) else model


def preset_load_error(model: str, error: Exception) -> ValueError:
    """The error for a keras-hub preset that cannot be loaded: a name not on
    this machine needs a download.

    Args:
        model: the `--model` value.
        error: what keras-hub raised.

    Example:

    >>> error = preset_load_error("gpt2_base_en", OSError("no network"))
    >>> "needs a download" in str(error) and "save_to_preset" in str(error)
    True
    """
    first_line = (str(error).splitlines() or [""])[0]
    cause = f"{type(error).__name__}: {first_line}"
    if os.path.isdir(model):
        return ValueError(f"keras-hub cannot load the preset {model} ({cause})")
    return ValueError(
        f"keras-hub cannot load the preset {model} ({cause}); a preset name "
        "needs a download (network access, and Kaggle credentials for gated "
        "models): give a local directory instead, a Hugging Face directory or "
        "a keras-hub preset saved with save_to_preset"
    )


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """One encoded text, as `encode` reads a `tokenizers.Encoding`.

    Args:
        ids: the token ids.
        offsets: each token's (start, end) characters in the text; (0, 0)
            for a start token the tokenizer added.
    """

    ids: list[int]
    offsets: list[tuple[int, int]]


class PresetTokenizer:
    """A keras-hub preset's tokenizer, its special tokens and chat template.

    Args:
        tokenizer: the keras-hub `Tokenizer` (byte-pair or SentencePiece).
        chat_template: a template text that overrides the built-in one.
        source: the preset, for messages.
        template_origin: where `chat_template` comes from (for reports).

    Raises:
        ValueError: for a tokenizer that is neither byte-pair nor
            SentencePiece.

    Example:

    >>> tok = load_preset_tokenizer("PRESET_DIR")  # doctest: +SKIP
    >>> tok.encode_batch(["Hello"], add_special_tokens=False)[0].ids  # doctest: +SKIP
    [9906]
    """

    def __init__(
        self,
        tokenizer,
        chat_template: str | None = None,
        source: str = "the preset",
        template_origin: str | None = None,
    ):
        import keras_hub  # Only presets need keras-hub's tokenizers.

        self.keras_tokenizer = tokenizer
        self.source = source
        self.builtin = template_for_tokenizer(type(tokenizer))
        self.chat_template_source = chat_template
        self.template_origin = template_origin
        if chat_template is None and self.builtin is not None:
            self.chat_template_source = self.builtin.source
            self.template_origin = f"built-in ({self.builtin.family})"
        self.special_tokens = {
            name: getattr(tokenizer, attr)
            for name, attr in (
                ("bos_token", "start_token"),
                ("eos_token", "end_token"),
                ("pad_token", "pad_token"),
            )
            if getattr(tokenizer, attr, None) is not None
        }
        if isinstance(tokenizer, keras_hub.tokenizers.SentencePieceTokenizer):
            import sentencepiece

            self._spm = sentencepiece.SentencePieceProcessor(
                model_proto=tokenizer.proto
            )
            vocabulary = tokenizer.get_vocabulary()
            self._vocab = {piece: i for i, piece in enumerate(vocabulary)}
        elif isinstance(tokenizer, keras_hub.tokenizers.BytePairTokenizer):
            self._spm = None
            self._vocab = dict(tokenizer.vocabulary)
            self._bytes = _token_bytes(self._vocab, tokenizer.unsplittable_tokens)
        else:
            raise ValueError(
                f"{source} has a {type(tokenizer).__name__}; keras-lora sft "
                "reads keras-hub presets with a byte-pair or SentencePiece "
                "tokenizer"
            )
        atomic = set(tokenizer.special_tokens) | set(self.special_tokens.values())
        if self.builtin is not None and chat_template is None:
            atomic |= {m for m in self.builtin.markers if m in self._vocab}
        atomic = sorted((t for t in atomic if t in self._vocab), key=len, reverse=True)
        self._special = {self._vocab[t]: t for t in atomic}
        self._split = re.compile("|".join(map(re.escape, atomic))) if atomic else None
        self._template = None

    @property
    def eos_token(self) -> str | None:
        """The end token (TRL appends it to plain strings)."""
        return self.special_tokens.get("eos_token")

    @property
    def template(self) -> ChatTemplate:
        """The compiled chat template.

        Raises:
            MissingChatTemplate: for a family without a built-in template
                (GPT-2) and no `--chat-template`, or a built-in template
                whose turn markers the vocabulary lacks.
        """
        if self._template is None:
            if self.chat_template_source is None:
                kind = type(self.keras_tokenizer).__name__
                raise MissingChatTemplate(
                    f"{self.source} is a keras-hub preset with a {kind}, which "
                    "has no chat format (keras-hub presets carry no chat "
                    "template, and keras-lora has none built in for this "
                    "family), and conversational data needs one: give a Jinja "
                    "template file with --chat-template FILE"
                )
            if self.template_origin.startswith("built-in"):
                self._check_markers(self.builtin)
            self._template = ChatTemplate(
                self.chat_template_source, self.special_tokens
            )
        return self._template

    def _check_markers(self, builtin: BuiltinTemplate) -> None:
        missing = [m for m in builtin.markers if m not in self._vocab]
        if missing:
            raise MissingChatTemplate(
                f"the vocabulary of {self.source} has no {', '.join(missing)}, "
                f"which the built-in {builtin.family} template writes as single "
                "tokens: give a template in this model's own turn format with "
                "--chat-template FILE"
            )

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, None when the vocabulary lacks it."""
        return self._vocab.get(token)

    def special_tokens_by_id(self) -> dict[int, str]:
        """id -> text of the special tokens: keras-hub's, the start and end
        tokens, and the built-in template's turn markers."""
        return dict(self._special)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` (keras-hub's `detokenize`)."""
        text = self.keras_tokenizer.detokenize(list(ids))
        return text if isinstance(text, str) else str(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> TokenizedText:
        """Encode one text (`encode_batch` of one)."""
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(
        self, texts: list[str], add_special_tokens: bool = True
    ) -> list[TokenizedText]:
        """Encode many texts (see the module docstring).

        Args:
            texts: the texts.
            add_special_tokens: put the start token first, where the
                tokenizer has one.

        Returns:
            A `TokenizedText` per text.
        """
        # Every text as pieces: (start, end, id) of a special token, or
        # (start, end, None) of plain text, encoded all at once after.
        layouts, plain = [], []
        for text in texts:
            pieces, at = [], 0
            for match in self._split.finditer(text) if self._split else ():
                if match.start() > at:
                    pieces.append((at, match.start(), None))
                    plain.append(text[at : match.start()])
                pieces.append((match.start(), match.end(), self._vocab[match.group()]))
                at = match.end()
            if at < len(text):
                pieces.append((at, len(text), None))
                plain.append(text[at:])
            layouts.append(pieces)
        encoded = iter(self._encode_plain(plain))
        start = self.token_to_id(self.special_tokens.get("bos_token", ""))
        results = []
        for pieces in layouts:
            ids, offsets = [], []
            if add_special_tokens and start is not None:
                ids.append(start)
                offsets.append((0, 0))
            for begin, end, token in pieces:
                if token is not None:
                    ids.append(token)
                    offsets.append((begin, end))
                    continue
                piece_ids, piece_offsets = next(encoded)
                ids.extend(piece_ids)
                offsets.extend((begin + a, begin + b) for a, b in piece_offsets)
            results.append(TokenizedText(ids, offsets))
        return results

    def _encode_plain(self, texts: list[str]) -> list[tuple[list, list]]:
        """(ids, character offsets) of texts without special tokens."""
        if not texts:
            return []
        if self._spm is not None:
            try:
                protos = self._spm.encode(texts, return_type="proto")
            except TypeError:  # sentencepiece before 0.2.1 names it out_type.
                protos = self._spm.encode(texts, out_type="immutable_proto")
            return [
                (
                    [p.id for p in proto.pieces],
                    _char_offsets(text, [(p.begin, p.end) for p in proto.pieces]),
                )
                for text, proto in zip(texts, protos, strict=True)
            ]
        batch = self.keras_tokenizer.tokenize(texts)
        results = []
        for text, ids in zip(texts, batch, strict=True):
            ids = [int(i) for i in ids]
            spans, at = [], 0
            for token in ids:
                size = len(self._bytes[token])
                spans.append((at, at + size))
                at += size
            if at != len(text.encode("utf-8")):
                raise ValueError(
                    f"the tokens of {self.source} do not spell out the text "
                    f"{text[:40]!r}, so answer tokens cannot be located"
                )
            results.append((ids, _char_offsets(text, spans)))
        return results


def load_preset_tokenizer(
    model: str, chat_template: str | None = None
) -> PresetTokenizer:
    """Load the tokenizer of a keras-hub preset.

    Args:
        model: a preset name, handle or local `save_to_preset` directory.
        chat_template: a template file that overrides the built-in one.

    Returns:
        The `PresetTokenizer`.

    Raises:
        FileNotFoundError: if `chat_template` does not exist.
        ValueError: when keras-hub cannot load the preset (a name needs a
            download: the message says to give a local directory).

    Example:

    >>> load_preset_tokenizer("PRESET_DIR").template_origin  # doctest: +SKIP
    'built-in (llama3)'
    """
    template = None
    if chat_template is not None:
        if not os.path.isfile(chat_template):
            raise FileNotFoundError(f"no chat template file {chat_template}")
        with open(chat_template, encoding="utf-8") as f:
            template = f.read()
    import keras_hub  # Only presets need keras-hub here.

    try:
        tokenizer = keras_hub.models.Tokenizer.from_preset(model)
    except Exception as error:  # keras-hub and its download clients raise many.
        raise preset_load_error(model, error) from None
    return PresetTokenizer(tokenizer, template, model, chat_template)


def _token_bytes(vocab: dict[str, int], unsplittable) -> dict[int, bytes]:
    """The bytes each byte-level token id stands for (GPT-2's byte-to-
    character table, reversed); special tokens stand for their own text."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    special = set(unsplittable or ())
    result = {}
    for token, index in vocab.items():
        if token in special or not all(c in table for c in token):
            result[index] = token.encode("utf-8")
        else:
            result[index] = bytes(table[c] for c in token)
    return result


def _char_offsets(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte spans in `text`'s UTF-8 as character spans (a token that ends
    inside a character covers it)."""
    if text.isascii():
        return list(spans)
    starts = []  # the character at each byte
    for index, char in enumerate(text):
        starts.extend([index] * len(char.encode("utf-8")))
    starts.append(len(text))
    # An end inside a character (its byte's character is the one before's)
    # covers that character.
    ends = [starts[b] + (0 < b and starts[b] == starts[b - 1]) for _, b in spans]
    return [(starts[a], end) for (a, _), end in zip(spans, ends, strict=True)]
