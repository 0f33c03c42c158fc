"""Packing: several encoded examples share one row, none split across rows.

Rows are filled best-fit-decreasing up to `max_length` tokens. Each row
carries `segment_ids`: 1, 2, ... for its examples in order, 0 for padding.
The packed forward (`packed_model`) lets a position attend only to earlier
positions of its own segment (a block-diagonal causal mask), and targets
stop at each example's end: position i of an example predicts its own
token i + 1 where its labels count, never the next example's first token.
"""

from __future__ import annotations

import bisect

import numpy as np

from keras_lora.recipes.sft.encode import IGNORE, Encoded

__all__ = ["pack_rows", "packed_arrays"]


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Example indices per row, best-fit-decreasing.

    The longest example goes first, each into the row with the least room
    that still holds it (a new row when none does).

    Args:
        lengths: each example's token count, each at most `max_length`.
        max_length: tokens per row.

    Returns:
        Rows of example indices, in the order they were placed (longest
        first). Every index appears exactly once.

    Raises:
        ValueError: for an example longer than `max_length`.

    Example:

    >>> pack_rows([5, 3, 4, 2], 8)
    [[0, 1], [2, 3]]
    """
    rows: list[list[int]] = []
    # (room left, row) sorted, so the best fit is one bisection away.
    room: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        if size > max_length:
            raise ValueError(
                f"an example of {size} tokens does not fit a row of {max_length}"
            )
        at = bisect.bisect_left(room, (size, -1))
        if at < len(room):
            left, row = room.pop(at)
            rows[row].append(index)
            bisect.insort(room, (left - size, row))
        else:
            rows.append([index])
            bisect.insort(room, (max_length - size, len(rows) - 1))
    return rows


def packed_arrays(
    rows: list[list[Encoded]], length: int, pad_id: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(x, next-token targets, 0/1 loss mask) for packed rows.

    Args:
        rows: each row's examples, together no longer than `length`.
        length: the padded row length.
        pad_id: the id put in padded positions (never a target).

    Returns:
        x (`token_ids`, `segment_ids`), y and the mask, each (rows, length).

    Example:

    >>> a = Encoded([5, 6, 7], [-100, 6, 7], line=1)
    >>> b = Encoded([8, 9], [8, 9], line=2)
    >>> x, y, mask = packed_arrays([[a, b]], 6, 0)
    >>> x["segment_ids"].tolist(), y.tolist(), mask.tolist()
    ([[1, 1, 1, 2, 2, 0]], [[6, 7, 0, 9, 0, 0]], [[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    """
    n = len(rows)
    token_ids = np.full((n, length), pad_id, dtype="int32")
    segment_ids = np.zeros((n, length), dtype="int32")
    targets = np.zeros((n, length), dtype="int32")
    mask = np.zeros((n, length), dtype="float32")
    for r, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row, start=1):
            size = len(example.input_ids)
            end = start + size
            token_ids[r, start:end] = example.input_ids
            segment_ids[r, start:end] = segment
            # The example's last position has no target inside the example.
            labels = np.asarray(example.labels[1:], dtype="int64")
            keep = labels != IGNORE
            targets[r, start : end - 1] = np.where(keep, labels, 0)
            mask[r, start : end - 1] = keep
            start = end
        if start > length:
            raise ValueError(f"row {r} holds {start} tokens, more than {length}")
    return {"token_ids": token_ids, "segment_ids": segment_ids}, targets, mask
