"""Evaluation losses of `keras-lora sft`: once, and every N steps of `fit`.

A loss is the mean token cross-entropy over all label positions of the
evaluated examples (token-weighted, not a mean of per-example means), as
transformers computes it with `labels`.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from keras_lora import ChunkedCausalLM
from keras_lora.recipes.sft.batches import padded_arrays, sequence_length
from keras_lora.recipes.sft.buckets import bucket_length, packed_rows
from keras_lora.recipes.sft.encode import Encoded
from keras_lora.recipes.sft.packing import packed_arrays

__all__ = ["EvalEvery", "eval_loss"]


def _chunks(examples: list[Encoded], batch: int, pad_id: int, packed: int | None):
    """(x, y, mask) per forward pass: padded examples, or packed rows."""
    if packed is None:
        length = sequence_length(examples)
        for start in range(0, len(examples), batch):
            yield padded_arrays(examples[start : start + batch], length, pad_id)
        return
    rows = packed_rows(examples, packed)
    for start in range(0, len(rows), batch):
        chosen = rows[start : start + batch]
        used = max(sum(len(e.input_ids) for e in row) for row in chosen)
        yield packed_arrays(chosen, bucket_length(used, packed), pad_id)


def eval_loss(
    model,
    examples: list[Encoded],
    batch: int,
    pad_id: int,
    packed_length: int | None = None,
) -> float:
    """Mean token cross-entropy over all label positions of `examples`.

    Args:
        model: a causal LM taking `{"token_ids", "padding_mask"}`, a
            `ChunkedCausalLM` over one, or with `packed_length` a packed
            model (`packed_model.packed_causal_lm`).
        examples: encoded examples.
        batch: examples (packed: rows) per forward pass.
        pad_id: the padding id.
        packed_length: pack the examples into rows of this many tokens;
            None: one example per row.

    Returns:
        sum of per-token losses / number of label tokens (next-token
        targets, as transformers shifts `labels`).
    """
    total, count = 0.0, 0.0
    for x, y, mask in _chunks(examples, batch, pad_id, packed_length):
        logits = model(x, training=False)
        if isinstance(model, ChunkedCausalLM):  # Its call gives hidden states.
            logits = model.head(logits, **model.head_kwargs)
        losses = keras.losses.sparse_categorical_crossentropy(
            y, keras.ops.cast(logits, "float32"), from_logits=True
        )
        losses = np.asarray(keras.ops.convert_to_numpy(losses), dtype="float64")
        total += float((losses * mask).sum())
        count += float(mask.sum())
    return total / max(count, 1.0)


class EvalEvery(keras.callbacks.Callback):
    """`eval_loss` after every `every` train steps of one-epoch `fit`.

    Args:
        every: steps between evaluations, at least 1.
        examples: the encoded evaluation examples.
        batch: examples per forward pass.
        pad_id: the padding id.
        first_step: steps taken before this `fit` (a resumed run's), so
            evaluations fall where an uninterrupted run's do.
        packed_length: as `eval_loss`'s.

    Attributes:
        losses: `(step, loss)` pairs, steps counted from 1.
        seconds: wall time spent evaluating (to leave out of throughput).

    Example:

    >>> EvalEvery(0, [], 1, 0)
    Traceback (most recent call last):
    ...
    ValueError: every must be at least 1, got 0
    """

    def __init__(
        self,
        every: int,
        examples: list[Encoded],
        batch: int,
        pad_id: int,
        first_step: int = 0,
        packed_length: int | None = None,
    ):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = every
        self.examples = examples
        self.batch = batch
        self.pad_id = pad_id
        self.first_step = first_step
        self.packed_length = packed_length
        self.losses: list[tuple[int, float]] = []
        self.seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        step = self.first_step + batch + 1
        if step % self.every:
            return
        start = time.perf_counter()
        # `self.model` brings JAX's training state back into the variables.
        loss = eval_loss(
            self.model, self.examples, self.batch, self.pad_id, self.packed_length
        )
        self.losses.append((step, loss))
        self.seconds += time.perf_counter() - start
