"""Adding LoRA to a model: `inject_lora` and `wrap_layers` wrap layers,
`add_named_adapter` adds an adapter beside others, and `freeze_non_lora`
leaves only the LoRA factors trainable (`lora_layers`, trainable counts).

Which layers are chosen is `keras_lora.targeting`'s; finding and swapping
them in the layer tree is `keras_lora.surgery`'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import keras

from keras_lora import _keras_internals, adapter_state, dora
from keras_lora.adapter_state import check_adapter_name, names_in
from keras_lora.embedding import (
    LoraEmbedding,
    check_embedding,
    check_target,
    wrapper_for,
)
from keras_lora.layer import LoraLayer
from keras_lora.quantized import install_straight_through_gradients
from keras_lora.settings import LoraSettings
from keras_lora.surgery import (
    LayerIndex,
    containers,
    drop_compiled_functions,
    refresh_torch_params,
)
from keras_lora.targeting import all_linear_layers, target_layers


def inject_lora(
    model: keras.layers.Layer,
    rank: int = LoraSettings.rank,
    alpha: float = LoraSettings.alpha,
    targets: str | Sequence[str] = ("query", "value"),
    dropout: float = LoraSettings.dropout,
    use_rslora: bool = LoraSettings.use_rslora,
    seed: int | None = LoraSettings.seed,
    adapter_name: str = "default",
    init: str = LoraSettings.init,
    use_dora: bool = LoraSettings.use_dora,
) -> keras.layers.Layer:
    """Wrap every target layer with a `LoraLayer` and freeze everything else.

    The targets are found anywhere in the layer tree, including layers held
    as attributes of subclassed layers (keras-hub attention's
    `_query_dense`). A target matches a layer when it equals the layer's
    name, equals the end of its path ("self_attention/query"), or is a
    regular expression that matches its name or a whole tail of its path
    ("feedforward_.*_dense", "transformer_layer_[01]/.*/query"; see
    `layer_paths`).

    Nothing changes unless every target matches and every matched layer can
    be wrapped. A model compiled but not yet trained (keras-hub task models
    compile themselves) trains the LoRA factors as it is. A model that has
    trained already must be compiled again, since its optimizer was built
    for other variables: `fit` is disabled until then, with a warning that
    says so.

    Args:
        model: a built Keras model or layer.
        rank: rank of each update, a positive integer.
        alpha: the update is scaled by `alpha / rank`.
        targets: layer names, path suffixes or path regexes; a string is
            one target. `"all-linear"` (PEFT's shortcut) targets every
            Dense and EinsumDense that LoRA can factor, except the layers
            whose outputs are the model's outputs (a classifier or output
            head); embeddings are never in it (as in PEFT), but can be
            named: `targets=("query", "value", "token_embedding")` wraps
            the embedding in a `LoraEmbedding` (see
            `keras_lora.embedding`: the lookup and a tied output head get
            the low-rank update). Names beside `"all-linear"` add their
            layers to it: `("all-linear", "token_embedding")`.
        dropout: dropout rate on the LoRA path's input, in [0, 1).
        use_rslora: scale by `alpha / sqrt(rank)` instead.
        seed: seed for the factors' initialisation and dropout.
        adapter_name: the adapter's name. Into a model that already holds
            adapters, a new name adds one more beside them: layers already
            wrapped get another pair of factors, other targets get
            wrapped. Like PEFT's `add_adapter`, it starts inactive and
            frozen; `set_adapter(model, name)` activates it (and makes it
            the trainable one).
        init: how the factors start (PEFT's `init_lora_weights`):
            `"kaiming"` (default), `"gaussian"`, `"pissa"`,
            `"pissa_niter_K"` or `"olora"`; see `keras_lora.initialization`.
            PiSSA and OLoRA move the kernels' principal part into the
            factors (the model's outputs do not change); their adapters
            save and export as plain rank-2r LoRA for the original base.
        use_dora: DoRA: each wrapped layer also trains a magnitude per
            output feature, starting at its kernel's column norms, and
            computes `m / ||W + s·A·B|| * (x·(W + s·A·B)) + bias` as PEFT's
            `use_dora=True` does (see `keras_lora.dora`). `merge_lora`
            folds it into the kernel; adapter files and PEFT
            export/import carry it. Refused over a quantized layer.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: for a bad setting (an unknown `init`, PiSSA/OLoRA
            on a quantized kernel or beside another adapter; DoRA,
            PiSSA/OLoRA or a quantized table for an embedding), a target
            that matches nothing or cannot be wrapped, or an
            `adapter_name` the model already holds. The model is unchanged
            then.

    Example:

    >>> model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(128),
    ...                           keras.layers.Dense(10)])
    >>> model = inject_lora(model, rank=2, targets=("dense.*",))
    >>> [layer.name for layer in lora_layers(model)]
    ['dense', 'dense_1']
    """
    LoraSettings(rank=rank, alpha=alpha, dropout=dropout, init=init)
    check_adapter_name(adapter_name)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    settings = dict(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        seed=seed,
        init=init,
    )
    if use_dora:  # Only when asked: older callers' settings stay as they were.
        settings["use_dora"] = True
    index = LayerIndex(model)  # The only walk of the tree.
    if "all-linear" in targets:
        chosen = all_linear_layers(model, index=index)
        named = tuple(t for t in targets if t != "all-linear")
        if named:  # More layers beside the linear ones (an embedding, say).
            known = {id(layer) for layer in chosen}
            chosen += [
                layer
                for layer in target_layers(model, named, index=index)
                if id(layer) not in known
            ]
    else:
        chosen = target_layers(model, targets, index=index)
    existing = index.lora_layers()
    if not existing:
        settings["adapter_name"] = adapter_name
        return wrap_layers(
            model, {id(layer): settings for layer in chosen}, index=index
        )
    # Beside adapters already there (see `keras_lora.switching`).
    return add_named_adapter(
        model, {id(layer): settings for layer in chosen}, adapter_name, index=index
    )


def wrap_layers(
    model: keras.layers.Layer,
    settings: dict[int, dict],
    *,
    index: LayerIndex | None = None,
) -> keras.layers.Layer:
    """Wrap chosen layers, each with its own `LoraLayer` arguments.

    The building block of `inject_lora`, `load_adapter` and `import_peft`:
    `settings` maps `id(layer)` to the keyword arguments of its `LoraLayer`.
    Every layer is checked before any is wrapped, so an error leaves the
    model unchanged; afterwards every other weight is frozen.

    Args:
        model: a built model.
        settings: `id(layer) -> LoraLayer keyword arguments`, for layers
            under `model`.
        index: the caller's `LayerIndex(model)`, to save a walk of the
            tree; it is updated to the wrapped layers.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: if a key is not a layer under `model`, a layer cannot
            be wrapped, or a setting is out of range.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    >>> _ = wrap_layers(model, {id(model.layers[0]): {"rank": 1}})
    >>> [(layer.name, layer.rank) for layer in lora_layers(model)]
    [('d', 1)]
    """
    if index is None:
        index = LayerIndex(model)
    index.check_model(model)
    layers = index.by_id()
    for key, kwargs in settings.items():
        if key not in layers:
            raise ValueError(
                f"wrap_layers: {key!r} is not the id of a layer under model "
                f"'{model.name}'. Key `settings` by `id(layer)` of its layers."
            )
        # PiSSA/OLoRA rewrite kernels: refuse before any layer changes.
        check_target(layers[key], kwargs)
    index.swap(
        {key: wrapper_for(layers[key], **kwargs) for key, kwargs in settings.items()}
    )
    freeze_non_lora(model, index=index)
    # Before or after this call the model may be quantized to int8: its
    # output head then needs a correct input gradient (see the function).
    install_straight_through_gradients(model)
    if getattr(model, "compiled", False):
        refresh_compile_state(model)
    return model


def lora_layers(
    model: keras.layers.Layer, *, index: LayerIndex | None = None
) -> list[LoraLayer]:
    """The `LoraLayer`s in `model`, in a stable (depth-first) order.

    Args:
        model: any Keras model or layer.
        index: the caller's `LayerIndex(model)`, to save a walk of the tree.
    """
    if index is None:
        index = LayerIndex(model)
    index.check_model(model)
    return index.lora_layers()


def freeze_non_lora(
    model: keras.layers.Layer, *, index: LayerIndex | None = None
) -> keras.layers.Layer:
    """Make every weight that is not a LoRA factor non-trainable.

    Each weight gets its own flag, as PEFT sets `requires_grad`, and every
    leaf layer outside the LoRA factors is marked `trainable=False` too, so
    a model saved with `model.save` comes back frozen. Containers stay
    trainable: a frozen container would hide the LoRA factors inside it
    from `trainable_weights`.

    Args:
        model: any Keras model or layer.
        index: the caller's `LayerIndex(model)`, to save a walk of the tree.

    Returns:
        The same model.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    >>> _ = inject_lora(model, rank=1, targets="d")
    >>> model.layers[0].lora_b.trainable = False  # Say, by hand.
    >>> [w.name for w in freeze_non_lora(model).trainable_weights]
    ['lora_a', 'lora_b']
    """
    if index is None:
        index = LayerIndex(model)
    index.check_model(model)
    wrapped = index.lora_layers()
    # Only the active adapters train (all of them, with a single adapter).
    lora_ids = {id(v) for layer in wrapped for v in layer.lora_variables(True)}
    model.trainable = True
    for _, layer in index.items():
        if not _keras_internals.sublayers(layer) and not isinstance(layer, LoraLayer):
            layer.trainable = False
    for layer in wrapped:
        layer.original_layer.trainable = False
    for variable in model.weights:
        variable.trainable = id(variable) in lora_ids
    return model


def trainable_summary(model: keras.layers.Layer) -> dict[str, float]:
    """Counts of trainable and frozen parameters, like PEFT's summary.

    Returns:
        A dict with `trainable`, `non_trainable`, `total` and
        `trainable_percent`.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="d")])
    >>> _ = inject_lora(model, rank=2, targets="d")
    >>> trainable_summary(model)["trainable"]  # A (8, 2) and B (2, 4).
    24
    """
    trainable = sum(_size(v) for v in model.trainable_weights)
    non_trainable = sum(_size(v) for v in model.non_trainable_weights)
    total = trainable + non_trainable
    return {
        "trainable": trainable,
        "non_trainable": non_trainable,
        "total": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
    }


def print_trainable_parameters(model: keras.layers.Layer) -> None:
    """Print `trainable params: ... || all params: ... || trainable%: ...`.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="d")])
    >>> _ = inject_lora(model, rank=2, targets="d")
    >>> print_trainable_parameters(model)
    trainable params: 24 || all params: 60 || trainable%: 40.0000
    """
    s = trainable_summary(model)
    print(
        f"trainable params: {s['trainable']:,} || all params: {s['total']:,} "
        f"|| trainable%: {s['trainable_percent']:.4f}"
    )


def _size(variable) -> int:
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


def refresh_compile_state(model: keras.Model) -> None:
    """Keep a compiled model's training state in step with its trainable
    weights after LoRA factors were added, removed or switched.

    Before the optimizer is built, the compiled trainable flags are
    refreshed; after it, the model is marked uncompiled and a warning asks
    for a new `compile` (the built optimizer does not know the new
    variables).

    Args:
        model: the model whose trainable weights changed.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        # The optimizer is built from `trainable_variables` at the first
        # `fit`, which now lists the LoRA factors: nothing to redo.
        _keras_internals.refresh_compiled_trainable_state(model)
        return
    # The optimizer was built for the old trainable variables; running it
    # would not train the LoRA factors.
    model.compiled = False
    warnings.warn(
        f"Model '{model.name}' was compiled and trained before its trainable "
        "weights changed (LoRA injected, or an adapter added, removed or "
        "switched); its optimizer does not know the new ones. Call "
        "`model.compile(...)` again, with a new optimizer, before `fit`.",
        stacklevel=3,
    )


def add_named_adapter(
    model: keras.layers.Layer,
    settings: dict[int, dict],
    adapter_name: str,
    *,
    index: LayerIndex,
) -> keras.layers.Layer:
    """Add adapter `adapter_name` (inactive) to a model holding adapters.

    The step behind `inject_lora` and `load_adapter` into a model that
    holds adapters already: `settings` maps `id(layer)` (a `LoraLayer` or a
    layer to wrap) to its rank, alpha, dropout, use_rslora and seed.
    Wrapped layers get another pair of factors, others get wrapped.

    Raises:
        ValueError: if a chosen layer holds `adapter_name` already, or a
            layer cannot be wrapped; the model is unchanged.
    """
    layers = index.lora_layers()
    known = names_in(layers)
    # The same name may grow onto more layers (one `inject_lora` call per
    # rank, say), never onto a layer that holds it already.
    taken = [
        layer.name
        for layer in layers
        if id(layer) in settings and adapter_name in layer.adapters.names
    ]
    if taken:
        raise ValueError(
            f"Layers {taken} of model '{model.name}' already hold adapter "
            f"'{adapter_name}' (adapters: {list(known)}): they are already "
            "wrapped. Pick another `adapter_name` to add a second adapter, "
            "or `delete_adapter` / `merge_lora` first."
        )
    by_id = index.by_id()
    for key, kwargs in settings.items():
        options = LoraSettings.of(kwargs)
        layer = by_id[key]
        if isinstance(layer, LoraEmbedding):
            check_embedding(layer.original_layer, options)
        if options.use_dora and isinstance(layer, LoraLayer):
            dora.check_base(layer.original_layer, layer.split, options.init)
    for layer in layers:
        if id(layer) in settings:
            init = LoraSettings.of(settings[id(layer)]).init
            adapter_state.check_beside(layer, init)
    active = {n for n in known if any(n in x.adapters.active for x in layers)}
    wrapped = {id(layer) for layer in layers}
    fresh = {
        key: dict(kwargs, adapter_name=adapter_name)
        for key, kwargs in settings.items()
        if key not in wrapped
    }
    if fresh:
        wrap_layers(model, fresh, index=index)  # Checks all before changing.
    for layer in index.lora_layers():
        if id(layer) in settings and id(layer) in wrapped:
            adapter_state.add_adapter(layer, adapter_name, **settings[id(layer)])
        # Newly wrapped layers follow the model's active set.
        layer.adapters.active = tuple(n for n in layer.adapters.names if n in active)
    refresh_after_adapter_change(model)
    return model


def refresh_after_adapter_change(model: keras.layers.Layer) -> None:
    """After adapters were added, removed or switched: torch parameter
    lists, frozen flags, traced steps and the compile state follow."""
    if keras.backend.backend() == "torch":
        # Every torch module lists the parameters below it: refresh them
        # for factors added or removed.
        refresh_torch_params(containers(model))
    index = LayerIndex(model)
    freeze_non_lora(model, index=index)
    drop_compiled_functions(model)
    if getattr(model, "compiled", False):
        refresh_compile_state(model)
