"""Token ids and labels for instruction data, equal to TRL's `SFTTrainer`.

The rules (TRL 1.16, `SFTTrainer._prepare_dataset`, default settings):

- `text`: the EOS token appended unless the text ends with it; encoded
  with the tokenizer's special tokens (a BOS where the model adds one);
  every token is a label.
- plain prompt-completion: the EOS appended to the completion (same rule);
  prompt and prompt + completion encoded with special tokens; the
  completion starts where the two token sequences first differ (TRL's
  `common_prefix_length`); only the completion is labelled.
- conversational prompt-completion: the prompt rendered with
  `add_generation_prompt=True`, the whole conversation rendered without;
  both encoded without special tokens (the template writes them); the
  completion (content and end-of-turn marker) is labelled from where the two
  differ. No EOS is appended.
- `messages`: beyond TRL, every assistant turn is labelled without
  `{% generation %}` markers: turn k spans the text between
  render(messages[:k], add_generation_prompt=True) and render(messages[:k+1]),
  both prefixes of the whole rendering; a token is labelled when it overlaps
  the span, as transformers builds `assistant_masks` from offsets. With
  markers around exactly those spans, the labels equal TRL's
  `assistant_only_loss=True`.
- `loss_on="all"`: every token is labelled, whatever the shape.
- Labels are unshifted (`labels[i] == input_ids[i]` or -100). Sequences
  longer than `max_length` keep their start; an example left with no label
  is dropped. Both are counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from keras_lora.recipes.sft.data import DataError, Example
from keras_lora.recipes.sft.tokenizer import MissingChatTemplate, ModelTokenizer

__all__ = ["IGNORE", "LOSS_ON", "Encoded", "EncodedData", "encode_examples"]

IGNORE = -100  # the Hugging Face label of a position without loss
LOSS_ON = ("answers", "all")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One encoded example.

    Args:
        input_ids: the token ids.
        labels: `input_ids` where the loss applies, -100 elsewhere.
        line: the example's line in its data file.
        truncated: whether `max_length` cut it.

    Example:

    >>> Encoded([1, 2], [-100, 2], line=1).label_tokens
    1
    """

    input_ids: list[int]
    labels: list[int]
    line: int
    truncated: bool = False

    @property
    def label_tokens(self) -> int:
        """How many positions carry a loss."""
        return sum(label != IGNORE for label in self.labels)


@dataclasses.dataclass(frozen=True)
class EncodedData:
    """The kept examples and the counts of what happened to the others.

    Args:
        examples: the kept, encoded examples in file order.
        total: how many examples the file held.
        truncated: kept examples cut to `max_length`.
        dropped: examples whose labels were all cut away.
        max_length: the length limit used.

    Example:

    >>> data = EncodedData([Encoded([1, 2], [1, 2], line=1)], 1, 0, 0, 8)
    >>> data.report()["label_tokens"]
    2
    """

    examples: list[Encoded]
    total: int
    truncated: int
    dropped: int
    max_length: int

    def report(self) -> dict:
        """Counts for `data_report.json` and `report.json`'s `data`."""
        lengths = [len(e.input_ids) for e in self.examples]
        return {
            "examples": self.total,
            "kept": len(self.examples),
            "tokens": sum(lengths),
            "label_tokens": sum(e.label_tokens for e in self.examples),
            "truncated": self.truncated,
            "dropped": self.dropped,
            "max_length": self.max_length,
            "longest": max(lengths, default=0),
            "length_histogram": length_histogram(lengths, self.max_length),
        }


def length_histogram(lengths: Sequence[int], max_length: int) -> dict[str, int]:
    """Counts of lengths in power-of-two bins ("1-16", "17-32", ...) up to
    `max_length`.

    Example:

    >>> length_histogram([3, 20, 20, 40], 64)
    {'1-16': 1, '17-32': 2, '33-64': 1}
    """
    edges = [16]
    while edges[-1] < max_length:
        edges.append(min(edges[-1] * 2, max_length))
    counts = {}
    low = 1
    for high in edges:
        counts[f"{low}-{high}"] = sum(low <= n <= high for n in lengths)
        low = high + 1
    return counts


def encode_examples(
    examples: Sequence[Example],
    tokenizer: ModelTokenizer,
    max_length: int = 1024,
    loss_on: str = "answers",
    source: str = "data",
) -> EncodedData:
    """Encode examples as TRL's `SFTTrainer` does (see the module docstring).

    Args:
        examples: validated examples (`data.read_examples`).
        tokenizer: the model's tokenizer and chat template.
        max_length: the longest sequence; longer ones keep their start.
        loss_on: "answers" (completions, assistant turns, or all of a text)
            or "all" (every token).
        source: the data file's name, for error messages.

    Returns:
        The `EncodedData`.

    Raises:
        ValueError: for an unknown `loss_on`, a missing chat template or EOS
            token, or a template that fails (a `DataError` naming the line).

    Example:

    >>> data = encode_examples(read_examples("d.jsonl"), tok)  # doctest: +SKIP
    >>> data.examples[0].labels  # doctest: +SKIP
    [-100, -100, 512, 7]
    """
    if loss_on not in LOSS_ON:
        raise ValueError(
            f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}"
        )
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    plans = []
    for example in examples:
        try:
            plans.append(_plan(example, tokenizer, loss_on))
        except (DataError, MissingChatTemplate):
            raise
        except ValueError as error:
            # Template failures belong to one example: name its line.
            raise DataError(f"{source} line {example.line}: {error}") from None
    encodings = _encode_all(plans, tokenizer)
    kept, truncated, dropped = [], 0, 0
    for example, plan, encoded in zip(examples, plans, encodings, strict=True):
        ids, labels = _labels(plan, encoded)
        cut = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        truncated += cut
        kept.append(Encoded(ids, labels, line=example.line, truncated=cut))
    return EncodedData(kept, len(examples), truncated, dropped, max_length)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What to encode for one example and how to label it.

    `texts` is (prompt, prompt + completion) for prompt-completion (the
    completion starts where their tokens differ) or the one whole text;
    `spans` are the character spans of assistant turns (`messages`), None
    when every token of the whole text is labelled (`text`, `loss_on="all"`).
    """

    texts: tuple[str, ...]
    special_tokens: bool
    spans: tuple[tuple[int, int], ...] | None = None


def _plan(example: Example, tokenizer: ModelTokenizer, loss_on: str) -> _Plan:
    """Render one example (the Python part; encoding is batched after)."""
    if example.text is not None:
        return _Plan((_with_eos(example.text, tokenizer),), True)
    if example.messages is not None:
        return _plan_messages(example.messages, tokenizer, loss_on)
    if example.conversational:
        template = tokenizer.template
        full = template.render(example.prompt + example.completion)
        if loss_on == "all":
            return _Plan((full,), False)
        prompt = template.render(example.prompt, add_generation_prompt=True)
        return _Plan((prompt, full), False)
    full = example.prompt + _with_eos(example.completion, tokenizer)
    if loss_on == "all":
        return _Plan((full,), True)
    return _Plan((example.prompt, full), True)


def _plan_messages(
    messages: list[dict], tokenizer: ModelTokenizer, loss_on: str
) -> _Plan:
    """A conversation and the spans of its assistant turns (see module)."""
    template = tokenizer.template
    full = template.render(messages)
    if loss_on == "all":
        return _Plan((full,), False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = template.render(messages[:index], add_generation_prompt=True)
        # The last turn ends the conversation: its end is the whole text.
        last = index + 1 == len(messages)
        end_text = full if last else template.render(messages[: index + 1])
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise ValueError(
                f"the chat template renders the conversation before assistant "
                f"message {index} differently from the whole conversation, so "
                "its answer tokens cannot be found; use --loss-on all, or a "
                "template that renders earlier turns the same way"
            )
        spans.append((len(start_text), len(end_text)))
    return _Plan((full,), False, tuple(spans))


def _encode_all(plans: Sequence[_Plan], tokenizer: ModelTokenizer) -> list[list]:
    """Each plan's texts encoded, in batches (the tokenizer runs a batch in
    parallel); with special tokens or without, as each plan says."""
    results: list[list] = [[] for _ in plans]
    for special in (True, False):
        chosen = [i for i, plan in enumerate(plans) if plan.special_tokens == special]
        texts = [text for i in chosen for text in plans[i].texts]
        if not texts:
            continue
        encodings = iter(tokenizer.encode_batch(texts, add_special_tokens=special))
        for i in chosen:
            results[i] = [next(encodings) for _ in plans[i].texts]
    return results


def _labels(plan: _Plan, encodings: list) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example, before truncation."""
    ids = encodings[-1].ids
    if len(encodings) == 2:
        start = _common_prefix_length(encodings[0].ids, ids)
        return ids, [IGNORE] * start + ids[start:]
    if plan.spans is None:
        return ids, list(ids)
    mask = _overlap_mask(encodings[0].offsets, plan.spans)
    return ids, [i if bit else IGNORE for i, bit in zip(ids, mask, strict=True)]


def _overlap_mask(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """Whether each token (start, end) overlaps a character span: equal to
    transformers' loop for `assistant_masks` (`apply_chat_template`) for
    sorted, disjoint spans, vectorised because it runs over every token."""
    if not offsets:
        return []
    bounds = np.asarray(offsets)
    mask = np.zeros(len(bounds), dtype=bool)
    for start, end in spans:
        mask |= (bounds[:, 0] < end) & (bounds[:, 1] > start)
    return mask.tolist()


def _with_eos(text: str, tokenizer: ModelTokenizer) -> str:
    """`text` ending with the EOS token, as TRL's `add_eos` makes it."""
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError(
            f"{tokenizer.source} has no eos_token in tokenizer_config.json; plain "
            "text needs one to mark where an answer ends"
        )
    return text if text.endswith(eos) else text + eos


def _common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """TRL's `common_prefix_length`: the leading tokens both share."""
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length
