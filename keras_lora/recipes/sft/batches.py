"""Encoded examples as fixed-shape arrays for `model.fit`.

Every batch has the same shape (one compiled step): sequences are padded on
the right to one length, the longest kept example rounded up to a multiple
of 8. The targets are the next tokens (`labels` shifted left by one, as
transformers shifts them inside its loss), and the loss mask reaches `fit`
as `sample_weight`, each batch's weights divided by its count of label
tokens: with a "sum" loss reduction every step then minimises the mean
cross-entropy over the batch's label tokens, which is what transformers
computes with `labels`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_lora.recipes.sft.encode import IGNORE, Encoded

__all__ = [
    "Batches",
    "label_weights",
    "make_batches",
    "padded_arrays",
    "require_examples",
    "seeded_order",
]


@dataclasses.dataclass(frozen=True)
class Batches:
    """Arrays for `fit`, in step order (the caller passes `shuffle=False`).

    Args:
        x: `{"token_ids", "padding_mask"}`, each (steps * batch, length).
        y: next-token targets, (steps * batch, length).
        sample_weight: the per-batch normalised loss mask.
        padding_fraction: padded positions / all positions.
        label_tokens: label positions in all batches.

    Example:

    >>> b = make_batches([Encoded([5, 6, 7], [-100, 6, 7], line=1)], 1, 1, 0, 0)
    >>> b.y[0, :3].tolist(), b.sample_weight[0, :3].tolist()
    ([6, 7, 0], [0.5, 0.5, 0.0])
    """

    x: dict[str, np.ndarray]
    y: np.ndarray
    sample_weight: np.ndarray
    padding_fraction: float
    label_tokens: int


def padded_arrays(
    examples: list[Encoded], length: int, pad_id: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(x, next-token targets, 0/1 loss mask) for examples, right-padded.

    Args:
        examples: encoded examples no longer than `length`.
        length: the padded length.
        pad_id: the id put in padded positions (never a target).

    Returns:
        x (`token_ids`, `padding_mask`), y and the mask, each (n, length).

    Example:

    >>> x, y, mask = padded_arrays([Encoded([5, 6], [5, 6], line=1)], 4, 0)
    >>> x["token_ids"].tolist(), y.tolist(), mask.tolist()
    ([[5, 6, 0, 0]], [[6, 0, 0, 0]], [[1.0, 0.0, 0.0, 0.0]])
    """
    n = len(examples)
    token_ids = np.full((n, length), pad_id, dtype="int32")
    padding_mask = np.zeros((n, length), dtype="int32")
    targets = np.zeros((n, length), dtype="int32")
    mask = np.zeros((n, length), dtype="float32")
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        token_ids[row, :size] = example.input_ids
        padding_mask[row, :size] = 1
        # Position i predicts token i + 1, trained where labels[i + 1] counts.
        labels = np.asarray(example.labels[1:], dtype="int64")
        keep = labels != IGNORE
        targets[row, : size - 1] = np.where(keep, labels, 0)
        mask[row, : size - 1] = keep
    return {"token_ids": token_ids, "padding_mask": padding_mask}, targets, mask


def sequence_length(examples: list[Encoded]) -> int:
    """The longest example rounded up to a multiple of 8 (one shape)."""
    longest = max(len(e.input_ids) for e in examples)
    return -(-longest // 8) * 8


def require_examples(examples: list) -> None:
    """Raise unless there is an example (or packed row) to train on.

    Example:

    >>> require_examples([])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: no training example keeps an answer token within --max-length; ...
    """
    if not examples:
        raise ValueError(
            "no training example keeps an answer token within --max-length; "
            "raise --max-length"
        )


def seeded_order(n: int, count: int, seed: int) -> list[int]:
    """`count` indices of range(n): a fresh seeded permutation per pass.

    Args:
        n: how many items there are.
        count: how many indices to draw.
        seed: seeds the permutations.

    Example:

    >>> order = seeded_order(3, 7, 0)
    >>> len(order), sorted(order[:3]) == sorted(order[3:6]) == [0, 1, 2]
    (7, True)
    """
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < count:
        order.extend(rng.permutation(n).tolist())
    return order[:count]


def label_weights(mask: np.ndarray) -> np.ndarray:
    """One step's loss mask divided by its count of label tokens.

    Under a "sum" loss the step then minimises the mean cross-entropy over
    its label tokens. A step without label tokens (every example a single
    label at position 0) gets zero weight.

    Args:
        mask: the step's 0/1 loss mask, any shape.

    Example:

    >>> label_weights(np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])).tolist()
    [[0.25, 0.25, 0.0], [0.25, 0.25, 0.0]]
    """
    count = float(mask.sum())
    scale = 1.0 / count if count > 0 else 0.0
    return (mask * scale).astype("float32")


def make_batches(
    examples: list[Encoded], batch: int, steps: int, pad_id: int, seed: int
) -> Batches:
    """`steps` batches of `batch` examples, reshuffled (seeded) each pass.

    Args:
        examples: the kept training examples.
        batch: examples per step.
        steps: optimizer steps.
        pad_id: the padding id.
        seed: seeds the order.

    Returns:
        The `Batches`.

    Raises:
        ValueError: when there is no example (all were dropped).
    """
    require_examples(examples)
    order = seeded_order(len(examples), steps * batch, seed)
    chosen = [examples[i] for i in order]
    x, y, mask = padded_arrays(chosen, sequence_length(examples), pad_id)
    weights = np.concatenate(
        [label_weights(mask[s * batch : (s + 1) * batch]) for s in range(steps)]
    )
    padding = 1.0 - float(x["padding_mask"].mean())
    return Batches(x, y, weights, padding, int(mask.sum()))
