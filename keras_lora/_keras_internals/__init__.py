"""Every use of a private Keras (or keras-hub) attribute, and every import
from `keras.src`, in one place.

Each thing keras_lora needs that Keras does not export (swapping a
sublayer everywhere Keras tracks it, reading a quantized kernel's codes,
an int8 head's gradient, ...) is one small function here, whose docstring
names the private attribute it relies on and the Keras versions it was
checked on. Where keras-nightly 3.16.dev differs, a function detects the
feature itself, never a version string. tests/test_keras_internals.py
fails on a private Keras access anywhere else, so a Keras upgrade has
this package to read and nothing else: this module and `quantized` (the
quantized layers' internals, re-exported here), and `hub`, keras-hub's
internals (it imports keras_hub, so only modules above the core, which
import it as `keras_lora._keras_internals.hub`, use it).

"3.15" below means keras 3.15.1 with keras-hub 0.32.0, the pinned versions;
"3.16.dev" means keras-nightly 3.16.0.dev2026102704 with keras-hub-nightly
0.33.0.dev202610250352.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from keras_lora._keras_internals.quantized import (
    dequantize_kernel,
    intercept_quantized_call,
    loading_float_kernels,
    quantization_variables,
    stored_weight,
)

__all__ = [
    "autocast_scope",
    "current_stateless_scope",
    "dequantize_kernel",
    "flatten_layers",
    "intercept_quantized_call",
    "jax_train_state",
    "lay_out_variable",
    "loading_float_kernels",
    "move_graph_nodes",
    "optimizer_built_variables",
    "optimizer_learning_rate",
    "optimizer_own_variables",
    "own_variables",
    "producing_operation",
    "quantization_variables",
    "refresh_compiled_trainable_state",
    "refresh_torch_params",
    "rekey_graph_nodes",
    "replace_tracked_layer",
    "set_weight_path_prefix",
    "take_policy_from_map",
    "stored_value",
    "stored_weight",
    "sublayers",
    "torch_modules",
    "unlocked_tracker",
    "untrack_variable",
]

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


def take_policy_from_map(layer: keras.layers.Layer) -> None:
    """Give a layer built under a `DTypePolicyMap` its own policy: the
    map's entry for its path, or the map's default.

    Such a layer holds the whole map in `Layer._dtype_policy` (Keras 3.15;
    3.16.dev too, which adds a per-layer `_own_dtype_policy` not used here),
    and 3.15's `quantize` names the new policy after the held one
    ("int8_from_map_float32"), which no policy is; the public setter only
    adds an entry to the map.

    Args:
        layer: a built layer.
    """
    policy = layer._dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        layer._dtype_policy = policy[layer.path]
