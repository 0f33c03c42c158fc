"""`add_weighted_adapter`: a new adapter from a weighted mix of others.

The three combinations are PEFT's (`LoraModel.add_weighted_adapter` in
peft 0.21), with its numbers for the same factors. In PEFT's terms, with
A (rank, fan_in), B (fan_out, rank), s_i an adapter's scale and w_i its
weight:

- "cat": A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: the
  update is exactly sum_i w_i s_i B_i A_i, at the sum of the ranks.
- "linear": A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i,
  B = sum_i sqrt(|w_i s_i|) B_i: same ranks only, and an approximation
  (the cross terms B_i A_j stay in).
- "svd": the rank-r truncation (U S)[:, :r], Vh[:r] of the update
  sum_i w_i s_i B_i A_i, optionally clamped.

The new adapter has scale 1 (alpha = rank, as PEFT sets) since the scales
are folded into its factors. Keras holds A as (fan_in, rank) and B as
(rank, fan_out): the transposes of PEFT's, which the formulas follow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np

from keras_lora.adapter_state import check_adapter_name, names_in
from keras_lora.injection import add_named_adapter
from keras_lora.surgery import LayerIndex
from keras_lora.switching import check_names

COMBINATIONS = ("cat", "linear", "svd")


def add_weighted_adapter(
    model: keras.layers.Layer,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: str = "cat",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
) -> keras.layers.Layer:
    """Add adapter `adapter_name`, a weighted combination of `adapters`.

    As PEFT's `add_weighted_adapter`: every layer holding one of
    `adapters` gets the new adapter (inactive and frozen, like any added
    adapter: `set_adapter(model, adapter_name)` uses it). Its rank is
    PEFT's: the sum of the adapters' ranks ("cat") or `svd_rank`, by
    default the largest rank ("svd"), the same on every layer, where an
    adapter's rank is its largest over the layers and a layer needing
    fewer columns gets zero ones; "linear" keeps the adapters' common rank
    on each layer. With a single adapter the combination is "linear", as
    in PEFT.

    "svd" truncates each Keras layer's update on its own. Where several
    layers form one fused Hugging Face module (GPT-2's query, key and
    value in `c_attn`), PEFT truncates the fused update instead: the two
    agree when one role of the module is adapted or nothing is cut.

    Args:
        model: a model with named adapters.
        adapters: the adapters to combine, each once.
        weights: one number per adapter (negative subtracts it).
        adapter_name: the new adapter's name, not one the model holds.
        combination: "cat" (exact), "linear" (same ranks; approximate) or
            "svd" (the best rank-`svd_rank` approximation of the update).
        svd_rank: the rank "svd" keeps; by default the largest rank of
            `adapters`. Columns beyond a layer's own rank are zeros.
        svd_clamp: for "svd", a quantile in (0, 1]: the entries of both
            factors are clamped to +-that quantile of their values (PEFT's
            `svd_clamp`). It depends on the SVD's sign choices, so it may
            differ from PEFT's (torch's) result where theirs differ.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: for an unknown, repeated or missing adapter (the
            message lists the model's adapters), weights that are not one
            finite number per adapter, an `adapter_name` the model holds or
            cannot use, an unknown `combination`, "linear" over different
            ranks, a bad `svd_rank` or `svd_clamp`. The model is unchanged.

    Example:

    >>> from keras_lora import inject_lora, set_adapter
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    >>> _ = inject_lora(model, rank=1, alpha=2.0, targets="d")
    >>> _ = inject_lora(model, rank=2, alpha=2.0, targets="d", adapter_name="b")
    >>> _ = add_weighted_adapter(model, ["default", "b"], [0.5, 1.0], "mix")
    >>> mix = model.layers[0].adapters["mix"]
    >>> mix.rank, mix.scale  # "cat": ranks add; the scales are in the factors.
    (3, 1.0)
    """
    index = LayerIndex(model)
    layers = index.lora_layers()
    known = list(names_in(layers))
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no LoRA adapter to combine. Call "
            "`inject_lora(model, adapter_name=...)` first."
        )
    names = check_names(model, layers, adapters)
    check_adapter_name(adapter_name)
    if adapter_name in known:
        raise ValueError(
            f"Model '{model.name}' already holds adapter '{adapter_name}' "
            f"(adapters: {known}). Pick a new `adapter_name`, or "
            "`delete_adapter` it first."
        )
    weights = _check_weights(weights, names, known)
    if combination not in COMBINATIONS:
        raise ValueError(
            f"`combination` must be one of {COMBINATIONS}. Received: "
            f"combination={combination!r}"
        )
    _check_svd(svd_rank, svd_clamp)
    if len(names) == 1:
        combination = "linear"  # As PEFT: one adapter is only re-weighted.
    chosen = [x for x in layers if any(n in x.adapters for n in names)]
    # PEFT's rank of an adapter: its config's `r`, or the largest in its
    # `rank_pattern`; here, the largest over the layers.
    ranks = [max(x.adapters[n].rank for x in chosen if n in x.adapters) for n in names]
    if combination == "cat":
        rank = sum(ranks)
    elif combination == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(
                "combination='linear' adds the factors, so the adapters need "
                f"one rank; {dict(zip(names, ranks, strict=True))} differ. "
                "Use 'cat' (exact) or 'svd'."
            )
        rank = ranks[0]
    else:
        rank = svd_rank or max(ranks)
    factors, settings = {}, {}
    for layer in chosen:
        present = [(layer.adapters[n], w) for n, w in zip(names, weights, strict=True)
                   if n in layer.adapters]  # fmt: skip
        here = sorted({adapter.rank for adapter, _ in present})
        if combination == "linear":
            # The factors add: one rank per layer (PEFT's sum fails
            # otherwise); a single adapter keeps each layer's own.
            if len(here) > 1:
                raise ValueError(
                    "combination='linear' adds the factors, so the adapters "
                    f"need one rank on each layer; layer '{layer.name}' has "
                    f"ranks {here}. Use 'cat' or 'svd'."
                )
            rank = here[0]
        a, b = _combine(combination, present, rank, svd_clamp)
        factors[id(layer)] = (
            a.reshape(layer.split.in_shape + (rank,)),
            b.reshape((rank,) + layer.split.out_shape),
        )
        settings[id(layer)] = dict(
            rank=rank,
            alpha=float(rank),  # Scale 1: the scales are in the factors.
            dropout=present[0][0].dropout,  # PEFT: the first adapter's.
        )
    add_named_adapter(model, settings, adapter_name, index=index)
    for layer in LayerIndex(model).lora_layers():
        if adapter_name in layer.adapters:
            a, b = factors[id(layer)]
            new = layer.adapters[adapter_name]
            new.lora_a.assign(a.astype("float32"))
            new.lora_b.assign(b.astype("float32"))
    return model


def _check_weights(weights, names, known) -> list[float]:
    bad = isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence)
    if not bad:
        bad = len(weights) != len(names) or not all(
            isinstance(w, (int, float, np.number))
            and not isinstance(w, bool)
            and math.isfinite(w)
            for w in weights
        )
    if bad:
        raise ValueError(
            f"`weights` must be one finite number per adapter ({len(names)} "
            f"for {list(names)}; the model's adapters are {known}). "
            f"Received: weights={weights!r}"
        )
    return [float(w) for w in weights]


def _check_svd(svd_rank, svd_clamp) -> int | None:
    if svd_rank is not None and (
        isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0
    ):
        raise ValueError(
            f"`svd_rank` must be a positive integer or None. Received: {svd_rank!r}"
        )
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool)
        or not isinstance(svd_clamp, (int, float))
        or not 0 < svd_clamp <= 1
    ):
        raise ValueError(
            "`svd_clamp` must be a quantile in (0, 1] or None (no clamping). "
            f"Received: {svd_clamp!r}"
        )
    return svd_rank


def _matrices(adapter) -> tuple[np.ndarray, np.ndarray]:
    """An adapter's A (fan_in, rank) and B (rank, fan_out), float64."""
    a = np.asarray(keras.ops.convert_to_numpy(adapter.lora_a.value), "float64")
    b = np.asarray(keras.ops.convert_to_numpy(adapter.lora_b.value), "float64")
    return a.reshape(-1, adapter.rank), b.reshape(adapter.rank, -1)


def _combine(combination, present, rank, svd_clamp):
    """One layer's new A (fan_in, rank) and B (rank, fan_out)."""
    pairs = [(_matrices(adapter), w * adapter.scale) for adapter, w in present]
    fan_in, fan_out = pairs[0][0][0].shape[0], pairs[0][0][1].shape[1]
    new_a, new_b = np.zeros((fan_in, rank)), np.zeros((rank, fan_out))
    if combination == "cat":
        column = 0
        for (a, b), ws in pairs:
            new_a[:, column : column + a.shape[1]] = a * ws
            new_b[column : column + a.shape[1]] = b
            column += a.shape[1]
    elif combination == "linear":
        for (a, b), ws in pairs:
            # sqrt on both sides, the sign on A only (PEFT): B A gets w s.
            root = math.sqrt(abs(ws))
            new_a += a * (root if ws >= 0 else -root)
            new_b += b * root
    else:
        delta = sum(ws * (a @ b) for (a, b), ws in pairs)  # (fan_in, fan_out)
        # PEFT factors the (fan_out, fan_in) update: U S goes to B, Vh to A.
        u, s, vh = np.linalg.svd(delta.T, full_matrices=False)
        keep = min(rank, s.shape[0])
        u, vh = u[:, :keep] * s[:keep], vh[:keep]
        if svd_clamp is not None:
            high = np.quantile(np.concatenate([u.ravel(), vh.ravel()]), svd_clamp)
            u, vh = np.clip(u, -high, high), np.clip(vh, -high, high)
        new_a[:, :keep] = vh.T
        new_b[:keep] = u.T
    return new_a, new_b
