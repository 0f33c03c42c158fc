"""Several named adapters in one model: add, switch, disable, delete, mix.

One base model holds many adapters (one per task, customer or language).
`inject_lora(..., adapter_name=...)` adds them; `set_adapter` picks the
active ones (their updates add, and only they train); `disable_lora`
gives the base model's outputs; `delete_adapter` removes one;
`adapter_batch` serves a batch whose rows use different adapters in one
pass. Each layer's state lives in `keras_lora.adapter_state`.

Switching assigns variables that the layers read (`keras_lora.adapter_state`), so
the traced inference steps (`predict`, keras-hub's `generate`) stay in
use: no retrace per switch nor per set of names (`keras_lora.traces`).
Training steps are dropped when the trainable set changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import keras
import numpy as np  # noqa: F401 (the examples use it)

from keras_lora import adapter_state, traces
from keras_lora.injection import (
    freeze_non_lora,
    refresh_after_adapter_change,
    refresh_compile_state,
)
from keras_lora.layer import LoraLayer
from keras_lora.quantized import quantization_mode
from keras_lora.surgery import (
    LayerIndex,
    containers,
    drop_compiled_functions,
    refresh_torch_params,
)


def adapter_names(model: keras.layers.Layer) -> list[str]:
    """The names of the adapters in `model`, in the order they were added.

    Example:

    >>> from keras_lora import inject_lora
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    >>> _ = inject_lora(model, rank=1, targets="d")
    >>> _ = inject_lora(model, rank=2, targets="d", adapter_name="b")
    >>> adapter_names(model)
    ['default', 'b']
    """
    return list(adapter_state.names_in(LayerIndex(model).lora_layers()))


def active_adapters(model: keras.layers.Layer) -> list[str]:
    """The names of the active adapters in `model`."""
    layers = LayerIndex(model).lora_layers()
    names = adapter_state.names_in(layers)
    return [n for n in names if any(n in x.adapters.active for x in layers)]


def set_adapter(model: keras.layers.Layer, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters: their updates add; only they train.

    Every other adapter's factors are frozen, so `fit` trains exactly the
    active one(s). A model whose optimizer was built already must be
    compiled again (with a warning), as after `inject_lora`. The traced
    `predict` / `generate` steps are kept: the layers read the active set
    from their `adapter_gates` variables (created by the first switch,
    which alone makes Keras trace again).

    Args:
        model: a model with named adapters.
        names: one adapter name, or a list of them.

    Raises:
        ValueError: for an unknown name, a duplicate or an empty list (the
            message lists the model's adapters); the model is unchanged.

    Example:

    >>> from keras_lora import inject_lora
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    >>> _ = inject_lora(model, rank=1, targets="d")
    >>> _ = inject_lora(model, rank=2, targets="d", adapter_name="b")
    >>> set_adapter(model, "b")
    >>> [w.name for w in model.trainable_weights]
    ['lora_a_b', 'lora_b_b']
    """
    layers = LayerIndex(model).lora_layers()
    names = check_names(model, layers, names)
    created = _ensure_controls(layers)
    trainable_before = model.trainable_variables
    for layer in layers:
        layer.adapters.active = tuple(n for n in names if n in layer.adapters)
    if created:  # The first switch: new variables, traced steps must go.
        traces.forget(model)
        refresh_after_adapter_change(model)
        return
    # The call reads the active set from the gates just assigned: traced
    # inference steps stay valid. Only training follows the new flags.
    freeze_non_lora(model)
    if [id(v) for v in model.trainable_variables] != list(map(id, trainable_before)):
        traces.pin_trainable(model, trainable_before)
        traces.drop_training_steps(model)
        if getattr(model, "compiled", False):
            refresh_compile_state(model)


@contextlib.contextmanager
def disable_lora(model: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """A context inside which `model` computes its base outputs exactly.

    Example:

    >>> from keras_lora import inject_lora
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    >>> _ = inject_lora(model, rank=1, targets="d")
    >>> with disable_lora(model):
    ...     model.layers[0].adapters.disabled
    True
    """
    layers = _lora_layers_or_raise(model)
    if _ensure_controls(layers):
        _after_new_controls(model)
    # The gates go to zero: the traced steps serve the base model as well.
    with _adapter_state(model, layers, "disabled", [True] * len(layers)):
        yield model


def delete_adapter(model: keras.layers.Layer, name: str) -> keras.layers.Layer:
    """Remove adapter `name`; a layer losing its last adapter is unwrapped.

    Args:
        model: a model with named adapters.
        name: the adapter to remove.

    Returns:
        The same model, modified in place.

    A PiSSA/OLoRA adapter's layers get their original kernels back.

    Raises:
        ValueError: if `model` has no adapter `name` (the message lists
            them), or it is a PiSSA/OLoRA adapter over a kernel quantized
            since; the model is unchanged.

    Example:

    >>> from keras_lora import inject_lora, lora_layers
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    >>> _ = inject_lora(model, rank=1, targets="d")
    >>> _ = inject_lora(model, rank=2, targets="d", adapter_name="b")
    >>> _ = delete_adapter(model, "default")
    >>> model.layers[0].adapter_name, model.layers[0].rank
    ('b', 2)
    >>> lora_layers(delete_adapter(model, "b"))
    []
    """
    index = LayerIndex(model)
    layers = index.lora_layers()
    (name,) = check_names(model, layers, name)
    unwrap = {}
    for layer in layers:
        if name not in layer.adapters:
            continue
        if layer.adapters.names == (name,):
            unwrap[id(layer)] = layer
    for layer in unwrap.values():
        mode = quantization_mode(layer.original_layer)
        if layer.adapters.first.rewrites_kernel and mode is not None:
            raise ValueError(
                f"Layer '{layer.name}' holds PiSSA/OLoRA adapter '{name}' over "
                f"a kernel quantized ({mode}) after it was added: the original "
                "kernel cannot be put back exactly. Merge it instead "
                "(`merge_lora(model, quantized=...)`)."
            )
    for layer in layers:
        if name in layer.adapters and id(layer) not in unwrap:
            adapter_state.remove_adapter(layer, name)
    if unwrap:
        for layer in unwrap.values():
            # A PiSSA/OLoRA kernel is the residual: the original comes back.
            layer.adapters.first.initial.restore_kernel(layer)
        index.swap({key: layer.unwrap() for key, layer in unwrap.items()})
    refresh_after_adapter_change(model)
    return model


@contextlib.contextmanager
def adapter_batch(
    model: keras.layers.Layer, names: Sequence[str | None]
) -> Iterator[keras.layers.Layer]:
    """A context inside which row `i` of each batch uses adapter `names[i]`.

    `None` is the base model. Each call concatenates every wrapped
    layer's factors along the rank, in a fixed order, and weights each
    rank column per row by that row's one-hot choice (and its adapter's
    scale) between two matmuls: one pass whatever the number of distinct
    adapters, no loop over them. The rows' choice is an int32 variable per
    layer, assigned on entering: a later `adapter_batch` with other names
    but the same number of rows reuses the traced `predict` / `generate`
    steps (a new size traces once more). Meant for inference: adapter
    dropout is not applied.

    Args:
        model: a model with named adapters.
        names: one adapter name (or `None`) per row of the batches the
            model will be called on.

    Raises:
        ValueError: for an unknown name or an empty `names` (the message
            lists the adapters); when called on a batch whose size is not
            `len(names)`. The model is unchanged.

    Example:

    >>> from keras_lora import inject_lora
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    >>> _ = inject_lora(model, rank=1, targets="d")
    >>> x = np.ones((2, 4), "float32")
    >>> with adapter_batch(model, ["default", None]):
    ...     tuple(model(x).shape)
    (2, 2)
    """
    layers = _lora_layers_or_raise(model)
    known = adapter_state.names_in(layers)
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(
            "`names` must be a non-empty list with one adapter name (or None, "
            f"the base model) per row. Known adapters: {list(known)}. "
            f"Received: {names!r}"
        )
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise ValueError(
            f"Unknown adapter(s) {sorted(set(map(str, unknown)))} in `names`; "
            f"model '{model.name}' has adapters {list(known)}."
        )
    for layer in layers:
        adapter_state.check_batchable(layer)
    if _ensure_controls(layers):
        _after_new_controls(model)
    if any([adapter_state.ensure_controls(layer, len(names)) for layer in layers]):
        # First mixed batch of this size: new rows variables. Uniform steps
        # do not read them (JAX traces them once more, for the new state);
        # mixed steps traced for another size read the old ones.
        if keras.backend.backend() == "torch":
            refresh_torch_params(containers(model))
        traces.forget(model, lambda mode: mode != "uniform")
    for layer in layers:
        adapter_state.write_rows(layer, names)
    # The mixed call is Python state a trace bakes in: each mode keeps its
    # own traced steps, so later batches (other names, same size) reuse them.
    mixed = ("mixed", len(names))
    traces.switch_mode(model, "uniform", mixed)
    try:
        with _adapter_state(model, layers, "batching", [True] * len(layers)):
            yield model
    finally:
        traces.switch_mode(model, mixed, "uniform")


def _lora_layers_or_raise(model) -> list[LoraLayer]:
    layers = LayerIndex(model).lora_layers()
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no LoRA adapter. Call "
            "`inject_lora(model)` (or `load_adapter`) first."
        )
    return layers


def check_names(model, layers, names) -> tuple:
    """`names` (one or several) as a tuple, each an adapter of `layers`.

    Raises:
        ValueError: for no name, a repeated name or an unknown one, listing
            the known adapters.
    """
    known = adapter_state.names_in(layers)
    single = isinstance(names, str)
    names_tuple = (names,) if single else tuple(names) if names is not None else ()
    if not names_tuple or not all(isinstance(n, str) for n in names_tuple):
        raise ValueError(
            "Pass an adapter name or a non-empty list of them. Known adapters: "
            f"{list(known)}. Received: {names!r}"
        )
    if len(set(names_tuple)) != len(names_tuple):
        raise ValueError(
            f"Adapter names {list(names_tuple)} repeat a name; give each once. "
            f"Known adapters: {list(known)}."
        )
    unknown = [n for n in names_tuple if n not in known]
    if unknown:
        raise ValueError(
            f"Model '{model.name}' has no adapter {unknown}; its adapters are "
            f"{list(known)}."
        )
    return names_tuple


@contextlib.contextmanager
def _adapter_state(model, layers, attribute: str, values: list) -> Iterator[None]:
    """Set `layer.adapters.<attribute>` per layer for the context, then put
    the old values back."""
    before = [getattr(layer.adapters, attribute) for layer in layers]
    for layer, value in zip(layers, values, strict=True):
        setattr(layer.adapters, attribute, value)
    try:
        yield
    finally:
        for layer, value in zip(layers, before, strict=True):
            setattr(layer.adapters, attribute, value)


def _ensure_controls(layers) -> bool:
    """Every layer's gates; whether any variable was created."""
    return any([adapter_state.ensure_controls(layer) for layer in layers])


def _after_new_controls(model) -> None:
    """Control variables were created: torch parameter lists follow, and
    steps traced without them go (a mode switch is free from then on)."""
    if keras.backend.backend() == "torch":
        refresh_torch_params(containers(model))
    traces.forget(model)
    drop_compiled_functions(model)
