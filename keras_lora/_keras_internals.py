"""Every use of a private Keras (or keras-hub) attribute, and every import
from `keras.src`, in one place.

Each thing keras_lora needs that Keras does not export (swapping a
sublayer everywhere Keras tracks it, reading a quantized kernel's codes,
an int8 head's gradient, ...) is one small function here, whose docstring
names the private attribute it relies on and the Keras versions it was
checked on. Where keras-nightly 3.16.dev differs, a function detects the
feature itself, never a version string. tests/test_keras_internals.py
fails on a private Keras access anywhere else, so a Keras upgrade has
this file to read and nothing else.

"3.15" below means keras 3.15.1 with keras-hub 0.32.0, the pinned versions;
"3.16.dev" means keras-nightly 3.16.0.dev2026102704 with keras-hub-nightly
0.33.0.dev202610250352.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import keras
from keras import ops

# --- Layer tree --------------------------------------------------------------


def sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers `layer` tracks directly (its children), in tracking order.

    Relies on `Layer._layers` (Keras 3.0 to 3.16.dev, unchanged). Keras's
    public `Layer.layers` exists on models only.

    Args:
        layer: any Keras layer or model.
    """
    return layer._layers


def flatten_layers(
    layer: keras.layers.Layer, include_self: bool = True
) -> list[keras.layers.Layer]:
    """`layer` (if `include_self`) and every layer under it, each once.

    Relies on `Layer._flatten_layers(include_self, recursive)` (Keras 3.0
    to 3.16.dev, unchanged).

    Args:
        layer: any Keras layer or model.
        include_self: whether `layer` itself is listed first.
    """
    return list(layer._flatten_layers(include_self=include_self))


def set_weight_path_prefix(layer: keras.layers.Layer, prefix: str) -> None:
    """Make the weights `layer` creates from now on have paths under
    `prefix` ("block/attention" gives "block/attention/query/lora_a").

    Keras prefixes a weight's path with the name scope at the layer's
    creation, kept in `Layer._parent_path` (Keras 3.5 to 3.16.dev,
    unchanged); a wrapper built outside the model's scopes sets it to the
    wrapped layer's.

    Args:
        layer: the layer, before it creates its weights.
        prefix: the path of the layer's parent, without a trailing "/".
    """
    layer._parent_path = prefix


# --- Variable tracking -------------------------------------------------------


@contextlib.contextmanager
def unlocked_tracker(layer: keras.layers.Layer) -> Iterator[None]:
    """Inside, `layer` tracks new weights and sublayers even when built.

    A built layer's tracker (`Layer._tracker`, Keras 3.0 to 3.16.dev) is
    locked, so `add_weight` and setting a sublayer attribute raise; this
    unlocks it and locks it again afterwards if it was locked.

    Args:
        layer: the layer to add weights or sublayers to.
    """
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()


def untrack_variable(layer: keras.layers.Layer, variable: keras.Variable) -> None:
    """Remove `variable` from `layer`'s weights (it is not deleted).

    Relies on `Layer._untrack_variable` (Keras 3.1 to 3.16.dev, unchanged).

    Args:
        layer: the layer that created `variable`.
        variable: one of the layer's own variables.
    """
    layer._untrack_variable(variable)


def own_variables(layer: keras.layers.Layer) -> list[keras.Variable]:
    """The variables `layer` created itself (not its sublayers'), trainable
    ones first, each in creation order.

    Relies on `Layer._trainable_variables` and `_non_trainable_variables`
    (Keras 3.0 to 3.16.dev, unchanged).

    Args:
        layer: any Keras layer.
    """
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def replace_tracked_layer(
    container: keras.layers.Layer, old: keras.layers.Layer, new: keras.layers.Layer
) -> None:
    """Put `new` where `old` is in `container`'s tracked layer list, if it
    is there.

    Relies on `Layer._tracker` and its `is_in_store` and
    `replace_tracked_value` on the "layers" store (Keras 3.0 to 3.16.dev,
    unchanged).

    Args:
        container: the layer that may track `old`.
        old: the layer to replace.
        new: the layer put in its place.
    """
    tracker = container._tracker
    if tracker.is_in_store("layers", old):
        tracker.replace_tracked_value("layers", old, new)


def torch_modules(layer: keras.layers.Layer) -> dict:
    """`layer`'s torch module registry (name -> sublayer), `{}` off torch.

    On the torch backend a Keras layer is a `torch.nn.Module` and keeps its
    sublayers in `Module._modules`, not in its `__dict__` (Keras 3.0 to
    3.16.dev; torch 2.x).

    Args:
        layer: any Keras layer.
    """
    return getattr(layer, "_modules", None) or {}


def refresh_torch_params(layer: keras.layers.Layer) -> None:
    """Rebuild `layer`'s torch parameter dict from its variables now, if it
    has one (torch backend, once the dict was first made).

    Relies on the torch backend's `TorchLayer._torch_params` (a
    `ParameterDict` of every variable under the layer, made lazily) and
    `TorchLayer._track_variables` (Keras 3.3 to 3.16.dev, unchanged).

    Args:
        layer: any Keras layer.
    """
    if "_torch_params" in vars(layer) or "_torch_params" in torch_modules(layer):
        layer._track_variables()


# --- Functional graph --------------------------------------------------------


def producing_operation(tensor) -> object | None:
    """The layer (operation) whose call produced the symbolic `tensor`, or
    `None` for a tensor with no history.

    Relies on `KerasTensor._keras_history` (a namedtuple with `operation`;
    Keras 3.0 to 3.16.dev, unchanged).

    Args:
        tensor: a `keras.KerasTensor` (a functional model's input or output).
    """
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def move_graph_nodes(old: keras.layers.Layer, new: keras.layers.Layer) -> None:
    """Hand `old`'s places in functional graphs over to `new`: its nodes,
    the history of the tensors those nodes made, and its outbound nodes.

    A functional model is serialised through its nodes' operations and its
    output tensors' histories, so after a swap they must name `new`.
    Relies on `Operation._inbound_nodes` / `_outbound_nodes`, `Node.operation`
    and `KerasTensor._keras_history` (Keras 3.0 to 3.16.dev, unchanged).

    Args:
        old: the layer taken out.
        new: the layer put in its place.
    """
    for node in old._inbound_nodes:
        node.operation = new
        for tensor in node.outputs:
            history = getattr(tensor, "_keras_history", None)
            if history is not None and history.operation is old:
                tensor._keras_history = history._replace(operation=new)
    new._inbound_nodes = old._inbound_nodes
    new._outbound_nodes = old._outbound_nodes
    old._inbound_nodes = []
    old._outbound_nodes = []


def rekey_graph_nodes(
    container: keras.layers.Layer, old: keras.layers.Layer, new: keras.layers.Layer
) -> None:
    """Rename `old`'s node keys to `new`'s in a functional model's node set.

    A `Functional` keys its nodes "{id(operation)}_ib-{index}" in
    `Functional._nodes` (Keras 3.0 to 3.16.dev, unchanged); a layer that is
    not functional has no such set and is left alone.

    Args:
        container: any layer (only a `Functional` has node keys).
        old: the layer taken out.
        new: the layer put in its place.
    """
    node_keys = vars(container).get("_nodes")
    if not isinstance(node_keys, set):
        return
    prefix = f"{id(old)}_ib-"
    for key in [k for k in node_keys if isinstance(k, str)]:
        if key.startswith(prefix):
            node_keys.remove(key)
            node_keys.add(f"{id(new)}_ib-{key[len(prefix) :]}")


# --- Training state ----------------------------------------------------------


def refresh_compiled_trainable_state(model: keras.Model) -> None:
    """Record the model's layers' current `trainable` flags as the ones it
    was compiled with, so the next `fit` does not recompile for them.

    Relies on `Trainer._compiled_trainable_state` (a dict layer -> flag;
    Keras 3.5 to 3.16.dev, unchanged); a model never compiled has none and
    is left alone.

    Args:
        model: a Keras model.
    """
    if hasattr(model, "_compiled_trainable_state"):
        model._compiled_trainable_state = {
            layer: layer.trainable for layer in flatten_layers(model)
        }


def jax_train_state(model: keras.Model) -> tuple:
    """The state tuple the JAX trainer's `train_step` takes (trainable,
    non-trainable, optimizer and metrics variables' values), the model's
    variables left in place.

    Relies on `JAXTrainer._get_jax_state` (Keras 3.0 to 3.16.dev,
    unchanged).

    Args:
        model: a compiled Keras model on the JAX backend whose optimizer is
            built.
    """
    return model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
        purge_model_variables=False,
    )


def optimizer_learning_rate(optimizer: keras.optimizers.Optimizer):
    """The learning rate `optimizer` was given: a float variable or a
    `LearningRateSchedule`, not its value at the current step (which the
    public `learning_rate` gives for a schedule).

    Relies on `BaseOptimizer._learning_rate` (Keras 3.0 to 3.16.dev,
    unchanged).

    Args:
        optimizer: any Keras optimizer.
    """
    return optimizer._learning_rate


def optimizer_own_variables(optimizer: keras.optimizers.Optimizer) -> list:
    """The variables `optimizer` itself made (its iteration counter and
    learning rate), not those of optimizers it wraps.

    Relies on `BaseOptimizer._variables` (Keras 3.0 to 3.16.dev,
    unchanged); the public `variables` may be overridden to add others.

    Args:
        optimizer: any Keras optimizer.
    """
    return optimizer._variables


def optimizer_built_variables(optimizer: keras.optimizers.Optimizer) -> list:
    """The model variables `optimizer` was built for, in build order.

    Relies on `BaseOptimizer._trainable_variables` (Keras 3.0 to 3.16.dev,
    unchanged).

    Args:
        optimizer: a built Keras optimizer.
    """
    return optimizer._trainable_variables


# --- Variables and scopes ----------------------------------------------------


def autocast_scope(dtype: str | None) -> contextlib.AbstractContextManager:
    """A scope inside which float variables read as `dtype`, or as they are
    stored with `None` (the scope a layer with `autocast=False` enters).

    `AutocastScope` is in `keras.src.backend.common` in Keras 3.0 to
    3.16.dev; 3.15 also re-exports it from `keras.src.backend`, 3.16.dev
    no longer does.

    Args:
        dtype: a float dtype name, or `None`.
    """
    from keras.src.backend.common import AutocastScope

    return AutocastScope(dtype)


def current_stateless_scope() -> keras.StatelessScope | None:
    """The innermost `keras.StatelessScope` (a traced JAX step runs in
    one), or `None`.

    Relies on `keras.src.backend.common.stateless_scope.get_stateless_scope`
    (Keras 3.0 to 3.16.dev, unchanged).
    """
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    return get_stateless_scope()


def stored_value(variable: keras.Variable):
    """`variable`'s stored value, read past any stateless scope (where the
    public `value` would give the scope's value).

    Relies on `Variable._value` (Keras 3.0 to 3.16.dev, unchanged).

    Args:
        variable: a Keras variable.
    """
    return variable._value


def lay_out_variable(
    variable: keras.Variable, distribution: keras.distribution.Distribution
) -> None:
    """Give `variable` the layout `distribution` asks for, replacing any
    layout it had (the caller assigns the value again to move it there).

    `Distribution.get_variable_layout` returns a variable's `_layout` as it
    is when set, so it is cleared first. Relies on `Variable._layout` (Keras
    3.1 to 3.16.dev, unchanged).

    Args:
        variable: a Keras variable.
        distribution: the distribution to lay it out for.
    """
    variable._layout = None
    variable._layout = distribution.get_variable_layout(variable)


# --- Quantized layers --------------------------------------------------------


def stored_weight(layer: keras.layers.Layer) -> keras.Variable:
    """The variable holding a quantized layer's codes: `kernel` of a
    Dense/EinsumDense, `embeddings` of an Embedding (int8 as stored; int4
    two codes per byte). A float layer's is its float weight.

    The public `kernel`/`embeddings` properties compute a tensor from it.
    Relies on `Dense._kernel`, `EinsumDense._kernel` and
    `Embedding._embeddings` (Keras 3.0 to 3.16.dev, unchanged).

    Args:
        layer: a built Dense, EinsumDense or Embedding layer.
    """
    if isinstance(layer, keras.layers.Embedding):
        return layer._embeddings
    return layer._kernel


def quantization_variables(layer: keras.layers.Layer) -> dict[str, keras.Variable]:
    """The variables a quantized layer holds under its mode, by the name of
    the attribute that holds each: the stored weight (by its public name,
    "kernel" or "embeddings"), the bias, and what quantization adds (scales,
    zero points, group indices, amax histories, ...). `{}` for a float layer.

    Read from the layer's own `variable_serialization_spec[mode]` (Keras
    3.10 to 3.16.dev) rather than from variable names: 3.16.dev renamed the
    int4 zero point variable "kernel_zero" to "zero_point" (the attribute
    is still `kernel_zero`). Entries a layer does not hold (no bias; no
    zero point per channel) are left out.

    Args:
        layer: a built Keras layer.
    """
    mode = getattr(layer, "quantization_mode", None)
    spec = getattr(layer, "variable_serialization_spec", None) or {}
    if mode is None or mode not in spec:
        return {}
    found = {}
    for name in spec[mode]:
        if name in ("kernel", "embeddings"):
            variable = stored_weight(layer)
        else:
            variable = getattr(layer, name, None)
        if isinstance(variable, keras.Variable):
            found[name] = variable
    return found


def dequantize_kernel(layer: keras.layers.Layer) -> object:
    """An int8 or int4 Dense/EinsumDense layer's kernel as float32, in the
    float kernel's shape: what its quantized call multiplies by.

    3.16.dev: the layer's own `Layer._quantized_weight()` view
    (`QuantizedWeight.dequantize`), which knows every mode's packing,
    scales and zero points. 3.15 has no such view, so the stored codes are
    dequantized here, from `_kernel`, `kernel_scale` (int8 EinsumDense:
    through `EinsumDense._adjust_scale_for_dequant`), and for int4
    `_int4_unpacked_column_size` (EinsumDense) / `_orig_output_dim` (Dense),
    `_int4_block_size` and, per block, `kernel_zero`, `g_idx` and
    `keras.src.quantizers.quantizers.dequantize_with_sz_map`.

    Args:
        layer: a built int8 or int4 Dense or EinsumDense layer.
    """
    view_of = getattr(layer, "_quantized_weight", None)
    if view_of is not None:
        view = view_of()
        return ops.cast(view.dequantize("float32"), "float32")
    mode = layer.quantization_mode
    einsum = isinstance(layer, keras.layers.EinsumDense)
    stored = ops.convert_to_tensor(layer._kernel)
    scale = ops.cast(ops.convert_to_tensor(layer.kernel_scale), "float32")
    if mode == "int8":
        if einsum:
            scale = layer._adjust_scale_for_dequant(scale)
        return ops.divide(ops.cast(stored, "float32"), scale)
    # int4: two codes per byte along the last axis of a (rows, columns)
    # matrix; per-channel scales, or per-block scales with zero points.
    from keras.src.quantizers.quantizers import dequantize_with_sz_map

    columns = layer._int4_unpacked_column_size if einsum else layer._orig_output_dim
    unpacked = keras.quantizers.unpack_int4(stored, columns, axis=-1)
    # Keras 3.15 reads it the same way: unset on layers it never grouped.
    block_size = getattr(layer, "_int4_block_size", None)
    if block_size is None or block_size == -1:
        kernel = ops.divide(ops.cast(unpacked, "float32"), scale)
    else:
        kernel = dequantize_with_sz_map(
            unpacked, scale, layer.kernel_zero, layer.g_idx, group_axis=0
        )
        kernel = ops.cast(kernel, "float32")
    if einsum:
        kernel = ops.reshape(kernel, layer.original_kernel_shape)
    return kernel


def intercept_quantized_call(
    layer: keras.layers.Layer, make_call: Callable[[Callable], Callable]
) -> None:
    """Route `layer`'s quantized forward pass through
    `make_call(keras_call)`, for this layer instance only.

    `keras_call(*args, **kwargs)` is the layer class's own quantized call.
    Keras picks the forward pass by looking up `self.quantized_call` on the
    instance whenever the layer is quantized (in `Operation.__call__`,
    `Layer.__call__` and `Layer.stateless_call` in 3.15;
    `Operation._dispatch_call` in 3.16.dev), so an instance attribute
    shadows the class method in every path. This is the one point both
    versions dispatch through: 3.15 then calls the mode's
    `Layer._int8_call`/`_int4_call`/..., 3.16.dev the mode's strategy in
    `keras.src.quantizers.strategy_registry` (`Int8Strategy._call_lookup`
    for an int8 `ReversibleEmbedding`), and neither of those has a
    per-instance hook. The attribute is set past Keras's `__setattr__`
    (no tracking) and torch's.

    Args:
        layer: the layer (quantized now or later).
        make_call: given the class's quantized call bound to `layer`,
            returns the call to use instead.
    """
    keras_call = type(layer).quantized_call.__get__(layer)
    object.__setattr__(layer, "quantized_call", make_call(keras_call))
