"""Choosing the layers LoRA adapts: targets by layer name, path suffix or
path regex (`target_layers`), PEFT's "all-linear" rule
(`all_linear_layers`), and the paths targets match (`layer_paths`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import keras

from keras_lora import _keras_internals
from keras_lora.embedding import LoraEmbedding
from keras_lora.kernel_split import split_kernel
from keras_lora.layer import LoraLayer
from keras_lora.surgery import LayerIndex


def target_layers(
    model: keras.layers.Layer,
    targets: Sequence[str],
    *,
    index: LayerIndex | None = None,
) -> list[keras.layers.Layer]:
    """The layers under `model` that `targets` match, in walk order.

    Args:
        model: a built model.
        targets: layer names, path suffixes or path regexes (see
            `inject_lora`).
        index: the caller's `LayerIndex(model)`, to save a walk of the tree.

    Returns:
        The matching layers, each once.

    Raises:
        ValueError: if `targets` is empty, a target is not a string, or a
            target matches no layer (the message lists the layers with
            kernels that could match).
    """
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            "`targets` must be a non-empty sequence of layer names or path "
            f"regexes, e.g. ('query', 'value'). Received: targets={targets!r}"
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built. Build it first (call it on "
            "a batch of data, or `model.build(input_shape)`), then add LoRA."
        )
    if index is None:
        index = LayerIndex(model)
    index.check_model(model)
    paths = index.items()
    # A regex matches a whole path suffix that starts at a "/" boundary: the
    # layer's name alone, or any tail of its path.
    patterns = {
        t: re.compile(rf"(?:.*/)?(?:{t})") if _is_regex(t) else None for t in targets
    }
    matched, hits = [], dict.fromkeys(targets, 0)
    for path, layer in paths:
        found = False
        for target, pattern in patterns.items():
            if (
                layer.name == target
                or path == target
                or path.endswith("/" + target)
                or (pattern is not None and pattern.fullmatch(path))
            ):
                hits[target] += 1
                found = True
        if found:
            matched.append(layer)
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        candidates = dict.fromkeys(
            layer.name
            for _, layer in paths
            if isinstance(layer, LoraLayer)
            or hasattr(layer, "kernel")
            or isinstance(layer, keras.layers.Embedding)
        )
        raise ValueError(
            f"No layer matched targets {tuple(missing)!r}; layers with "
            f"kernels or embedding tables: {', '.join(candidates) or 'none'}. "
            "Use a layer name, "
            "a path suffix, or a regex over the full path (see "
            "keras_lora.layer_paths(model))."
        )
    return matched


def all_linear_layers(
    model: keras.layers.Layer, index: LayerIndex | None = None
) -> list[keras.layers.Layer]:
    """What `targets="all-linear"` wraps, in walk order (PEFT's rule).

    Every Dense and EinsumDense whose kernel LoRA can factor, except those
    producing one of the model's outputs (a functional model's output
    head; keras-hub language models tie theirs to the embedding, which is
    no Dense). Nothing here knows any model family.

    Args:
        model: a built model.
        index: a `LayerIndex` of `model` the caller already built.

    Raises:
        ValueError: if the model is not built or has no such layer.
    """
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built. Build it first (call it on "
            "a batch of data, or `model.build(input_shape)`), then add LoRA."
        )
    heads = set()
    try:
        outputs = keras.tree.flatten(model.outputs or [])
    except (AttributeError, ValueError):  # A subclassed model or a layer.
        outputs = []
    for tensor in outputs:
        operation = _keras_internals.producing_operation(tensor)
        if operation is not None:
            heads.add(id(operation))
    layers = []
    for _, layer in (index or LayerIndex(model)).items():
        if isinstance(layer, LoraEmbedding):  # Not linear, as in PEFT.
            continue
        if isinstance(layer, LoraLayer):  # Linear, and wrapped already.
            layers.append(layer)
            continue
        if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            continue
        if id(layer) in heads or getattr(layer, "kernel", None) is None:
            continue
        try:
            split_kernel(layer)
        except ValueError:  # Not one input-to-output matrix: not linear.
            continue
        layers.append(layer)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no Dense or EinsumDense layer besides "
            "its output layers, so `targets='all-linear'` matches nothing."
        )
    return layers


def layer_paths(model: keras.layers.Layer) -> list[str]:
    """The paths `inject_lora` matches targets against, in walk order.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    >>> layer_paths(model)
    ['input_layer...', 'd']
    """
    return LayerIndex(model).paths()


def _is_regex(target: str) -> bool:
    return any(c in target for c in ".*+?[](){}|^$\\")
