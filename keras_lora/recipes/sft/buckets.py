"""The step batches of `keras-lora sft`: fixed padding, length buckets, packing.

Three ways to turn encoded examples into one batch per optimizer step:

- `fixed_steps`: every batch padded to one length (the longest example,
  rounded up to a multiple of 8); one input shape.
- `bucketed_steps` (the default): each example goes to the smallest of a
  fixed set of padded lengths that holds it (`bucket_lengths`: 8, 16, 32,
  ... up to `max_length` rounded up to a multiple of 8), and each batch is
  drawn from one bucket; a compiling backend traces one step function per
  bucket used, not one per batch.
- `packed_steps`: examples share rows of `max_length` tokens
  (`packing.pack_rows`); a batch of rows is padded to the bucket of its
  fullest row.

In all three the order is seeded and reshuffled on every pass, and each
batch's loss mask is divided by its count of label tokens (the
`sample_weight` under a "sum" loss: each step minimises the mean
cross-entropy over its label tokens, as transformers does with `labels`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_lora.recipes.sft.batches import (
    label_weights,
    make_batches,
    padded_arrays,
    require_examples,
    seeded_order,
)
from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.encode import Encoded
from keras_lora.recipes.sft.packing import pack_rows, packed_arrays

__all__ = [
    "StepBatches",
    "bucket_length",
    "bucket_lengths",
    "bucketed_steps",
    "fixed_steps",
    "packed_rows",
    "packed_steps",
    "plan_steps",
]

# A step's arrays: (x, next-token targets, normalised loss mask).
Step = tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class StepBatches:
    """One batch per optimizer step, in step order.

    Args:
        steps: `(x, y, sample_weight)` per step.
        real_tokens: non-padding tokens per step.
        rows: distinct rows the batches draw from (examples, or packed rows).
        examples: distinct examples in those rows.

    Example:

    >>> b = bucketed_steps([Encoded([5, 6, 7], [-100, 6, 7], line=1)], 1, 2, 0, 0, 64)
    >>> b.shapes, b.padding_fraction, b.examples_per_row
    ([(1, 8)], 0.625, 1.0)
    """

    steps: list[Step]
    real_tokens: list[int]
    rows: int
    examples: int

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The distinct (rows, length) input shapes, in first-use order."""
        seen: dict[tuple[int, int], None] = {}
        for x, _, _ in self.steps:
            seen.setdefault(tuple(x["token_ids"].shape), None)
        return list(seen)

    @property
    def padding_fraction(self) -> float:
        """Padding positions / all positions over all steps."""
        total = sum(x["token_ids"].size for x, _, _ in self.steps)
        return 1.0 - sum(self.real_tokens) / max(total, 1)

    @property
    def examples_per_row(self) -> float:
        """Distinct examples / distinct rows (1.0 unless packed)."""
        return self.examples / max(self.rows, 1)

    def after(self, done: int) -> StepBatches:
        """The steps after the first `done` (what a resumed run trains).

        Example:

        >>> example = Encoded([5, 6, 7], [-100, 6, 7], line=1)
        >>> b = bucketed_steps([example], 1, 3, 0, 0, 64)
        >>> len(b.after(2).steps), b.after(2).rows
        (1, 1)
        """
        return dataclasses.replace(
            self, steps=self.steps[done:], real_tokens=self.real_tokens[done:]
        )

    @property
    def label_tokens(self) -> int:
        """Label positions over all steps."""
        return int(sum(int(np.count_nonzero(w)) for _, _, w in self.steps))


def bucket_lengths(max_length: int) -> list[int]:
    """The padded lengths: powers of two from 8, then `max_length` rounded
    up to a multiple of 8.

    Args:
        max_length: the longest sequence in tokens.

    Example:

    >>> bucket_lengths(100)
    [8, 16, 32, 64, 104]
    """
    top = -(-max_length // 8) * 8
    lengths = []
    size = 8
    while size < top:
        lengths.append(size)
        size *= 2
    return lengths + [top]


def bucket_length(size: int, max_length: int) -> int:
    """The smallest bucket of `bucket_lengths(max_length)` holding `size`.

    Example:

    >>> bucket_length(9, 1024), bucket_length(1000, 1000)
    (16, 1000)
    """
    for length in bucket_lengths(max(max_length, size)):
        if size <= length:
            return length
    raise AssertionError("the last bucket holds max_length")


def fixed_steps(
    examples: list[Encoded], batch: int, steps: int, pad_id: int, seed: int
) -> StepBatches:
    """`steps` batches all padded to one length (`batches.make_batches`).

    Args:
        examples: the kept training examples.
        batch: examples per step.
        steps: optimizer steps.
        pad_id: the padding id.
        seed: seeds the order.
    """
    fixed = make_batches(examples, batch, steps, pad_id, seed)
    out, real = [], []
    for s in range(steps):
        part = slice(s * batch, (s + 1) * batch)
        x = {k: v[part] for k, v in fixed.x.items()}
        out.append((x, fixed.y[part], fixed.sample_weight[part]))
        real.append(int(x["padding_mask"].sum()))
    return StepBatches(out, real, rows=len(examples), examples=len(examples))


def bucketed_steps(
    examples: list[Encoded],
    batch: int,
    steps: int,
    pad_id: int,
    seed: int,
    max_length: int,
) -> StepBatches:
    """`steps` batches, each of `batch` examples of one length bucket.

    The examples are read in a seeded order (a fresh permutation per pass);
    each joins its bucket's open batch, and a batch is a step as soon as it
    is full, so the steps come in the order their batches filled.

    Args:
        examples: the kept training examples.
        batch: examples per step.
        steps: optimizer steps.
        pad_id: the padding id.
        seed: seeds the order.
        max_length: the longest sequence (sets the buckets).
    """
    require_examples(examples)
    rng = np.random.default_rng(seed)
    pending: dict[int, list[Encoded]] = {}
    out, real = [], []
    while len(out) < steps:
        for index in rng.permutation(len(examples)).tolist():
            example = examples[index]
            length = bucket_length(len(example.input_ids), max_length)
            group = pending.setdefault(length, [])
            group.append(example)
            if len(group) < batch:
                continue
            x, y, mask = padded_arrays(group, length, pad_id)
            out.append((x, y, label_weights(mask)))
            real.append(int(x["padding_mask"].sum()))
            pending[length] = []
            if len(out) == steps:
                break
    return StepBatches(out, real, rows=len(examples), examples=len(examples))


def packed_rows(examples: list[Encoded], max_length: int) -> list[list[Encoded]]:
    """The examples packed into rows of `max_length` tokens (`pack_rows`).

    Example:

    >>> rows = packed_rows([Encoded([1, 2], [1, 2], line=i) for i in range(3)], 4)
    >>> [len(row) for row in rows]
    [2, 1]
    """
    require_examples(examples)
    rows = pack_rows([len(e.input_ids) for e in examples], max_length)
    return [[examples[i] for i in row] for row in rows]


def packed_steps(
    rows: list[list[Encoded]],
    batch: int,
    steps: int,
    pad_id: int,
    seed: int,
    max_length: int,
    bucketed: bool = True,
) -> StepBatches:
    """`steps` batches of `batch` packed rows, in a seeded order per pass.

    Args:
        rows: the packed rows (`packed_rows`).
        batch: rows per step.
        steps: optimizer steps.
        pad_id: the padding id.
        seed: seeds the order.
        max_length: the row capacity.
        bucketed: pad a batch to the bucket of its fullest row; False:
            to `max_length` rounded up to a multiple of 8.
    """
    require_examples(rows)
    order = seeded_order(len(rows), steps * batch, seed)
    out, real = [], []
    for s in range(steps):
        chosen = [rows[i] for i in order[s * batch : (s + 1) * batch]]
        used = max(sum(len(e.input_ids) for e in row) for row in chosen)
        length = bucket_length(used if bucketed else max_length, max_length)
        x, y, mask = packed_arrays(chosen, length, pad_id)
        out.append((x, y, label_weights(mask)))
        real.append(int((x["segment_ids"] > 0).sum()))
    examples = sum(len(row) for row in rows)
    return StepBatches(out, real, rows=len(rows), examples=examples)


def plan_steps(config: SftConfig, examples: list[Encoded], pad_id: int) -> StepBatches:
    """The step batches of a run: packed, bucketed or fixed, as `config` says.

    With packing, `config.batch` counts rows and `config.epochs` passes
    over the rows.

    Args:
        config: the run's settings (`packing`, `buckets`, `batch`, steps or
            epochs, `max_length`, `seed`).
        examples: the kept training examples.
        pad_id: the padding id.

    Example:

    >>> config = SftConfig("m", "d.jsonl", "o", steps=2, batch=1, packing=True)
    >>> e = Encoded([5, 6, 7], [-100, 6, 7], line=1)
    >>> batches = plan_steps(config, [e, e], 0)
    >>> batches.rows, batches.examples_per_row, batches.shapes
    (1, 2.0, [(1, 8)])
    """
    on = config.buckets == "on"
    if config.packing:
        rows = packed_rows(examples, config.max_length)
        steps = config.total_steps(len(rows))
        return packed_steps(
            rows, config.batch, steps, pad_id, config.seed, config.max_length, on
        )
    steps = config.total_steps(len(examples))
    if not on:
        return fixed_steps(examples, config.batch, steps, pad_id, config.seed)
    return bucketed_steps(
        examples, config.batch, steps, pad_id, config.seed, config.max_length
    )
