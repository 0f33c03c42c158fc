"""Several adapters in one `LoraLayer`: their records, state and math.

A `LoraLayer` holds its adapters' records (`keras_lora.adapter_record`) in
an `AdapterState`: the first one's factors are named ".../query/lora_a",
later ones' ".../query/lora_a_<name>"; `new_adapter` here is the one
factory of records. While the layer has one adapter and was never
switched, `LoraLayer.call` takes its fast path (reshape and two matmuls);
every other case (several adapters, LoRA disabled, a mixed batch) runs
`apply` here, which reads the choice of adapters from variables so that
switching never traces the model again. The public functions are in
`keras_lora.switching`.
"""

from __future__ import annotations

import functools
import re

import keras
import numpy as np
from keras import ops

from keras_lora import _keras_internals, dora
from keras_lora.adapter_record import LORA, Adapter
from keras_lora.initialization import initialize_from_kernel
from keras_lora.low_rank import project
from keras_lora.settings import LoraSettings

_ALONE = (
    "a PiSSA/OLoRA adapter rewrites the kernel into a residual, so it must "
    "be the only adapter on its layers: another one beside it would see "
    "the residual, not the base kernel. Merge or delete one first, or use "
    "init='kaiming' or 'gaussian'."
)

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_adapter_name(name) -> None:
    """Raise `ValueError` unless `name` can name an adapter (and a variable)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            "An adapter name must be a non-empty string of letters, digits, "
            f"'_', '.' or '-' (e.g. 'default', 'task_b'). Received: {name!r}"
        )


class AdapterState:
    """The adapters of one layer, which are active, and the call mode.

    Until a layer's adapters are first switched (`set_adapter`,
    `disable_lora`, `adapter_batch`, or a second adapter), the active set
    is Python state and the first adapter alone takes the layer's fast
    path. From then on the layer holds `gates`, a non-trainable float32
    variable with one entry per adapter (1: active, 0: not), and the call
    reads it: switching assigns the variable, so traced steps stay valid
    and nothing is traced again. A mixed batch reads `rows`, an int32
    variable with each row's adapter (its index in the layer plus one, 0:
    the base), assigned on entering `adapter_batch`.
    """

    def __init__(self, first: Adapter):
        self.first = first
        self.by_name = {first.name: first}
        self.gates = None  # keras.Variable (adapters,) once switched.
        self.rows = None  # keras.Variable (batch,) once a batch was mixed.
        self.batching = False
        self._active = (first.name,)
        self._disabled = False

    def __getitem__(self, name: str) -> Adapter:
        return self.by_name[name]

    def __contains__(self, name) -> bool:
        return name in self.by_name

    @property
    def names(self) -> tuple:
        return tuple(self.by_name)

    @property
    def active(self) -> tuple:
        return self._active

    @active.setter
    def active(self, names) -> None:
        self._active = tuple(names)
        self.write_gates()

    @property
    def disabled(self) -> bool:
        return self._disabled

    @disabled.setter
    def disabled(self, value) -> None:
        self._disabled = bool(value)
        self.write_gates()

    @property
    def fast_path(self) -> bool:
        """Whether the call is the first adapter's alone, as LoRA (no
        gates, not disabled, the first adapter active and not DoRA)."""
        return (
            self.gates is None
            and not self._disabled
            and self._active == (self.first.name,)
            and self.first.variant.fusable
        )

    def write_gates(self) -> None:
        """Give `gates` the active set (zeros while disabled)."""
        if self.gates is None:
            return
        on = () if self._disabled else self._active
        values = [1.0 if n in on else 0.0 for n in self.by_name]
        self.gates.assign(np.array(values, "float32"))


def ensure_controls(layer, batch: int | None = None) -> bool:
    """Give `layer` its `gates` (and, for `batch` rows, `rows`) variables.

    Returns whether a variable was created or replaced: the model's
    variables changed, so traced steps must go (once).
    """
    state = layer.adapters
    created = False
    if state.gates is None or state.gates.shape[0] != len(state.by_name):
        _replace_control(layer, "gates", (len(state.by_name),), "float32")
        state.write_gates()
        created = True
    if batch is not None and (state.rows is None or state.rows.shape[0] != batch):
        _replace_control(layer, "rows", (batch,), "int32")
        created = True
    return created


def _replace_control(layer, attribute: str, shape: tuple, dtype: str) -> None:
    state = layer.adapters
    old = getattr(state, attribute)
    if old is not None:
        _keras_internals.untrack_variable(layer, old)
    with _keras_internals.unlocked_tracker(layer):
        variable = layer.add_weight(
            name=f"adapter_{attribute}",
            shape=shape,
            initializer="zeros",
            dtype=dtype,
            trainable=False,
        )
    setattr(state, attribute, variable)
    # Model files hold the factors only, as a layer never switched does (a
    # `LoraLayer` rebuilt from its config has no control variables).
    layer.save_own_variables = functools.partial(_save_factors, layer)
    layer.load_own_variables = functools.partial(_load_factors, layer)


def control_variables(layer) -> list:
    """`layer`'s gates and rows variables (not part of any adapter nor of
    the base model), those that exist."""
    return [v for v in (layer.adapters.gates, layer.adapters.rows) if v is not None]


def _factors(layer) -> list:
    controls = {id(v) for v in control_variables(layer)}
    own = _keras_internals.own_variables(layer)
    return [v for v in own if id(v) not in controls]


def _save_factors(layer, store) -> None:
    for i, variable in enumerate(_factors(layer)):
        store[f"{i}"] = variable


def _load_factors(layer, store) -> None:
    factors = _factors(layer)
    if len(store.keys()) != len(factors):
        raise ValueError(
            f"Layer '{layer.name}' holds {len(factors)} variables, but the file "
            f"has {len(store.keys())} for it. Load into a model built the same "
            "way (the same adapters)."
        )
    for i, variable in enumerate(factors):
        variable.assign(store[f"{i}"])


def write_rows(layer, names) -> None:
    """Each row's adapter for `layer`: its index here plus one (0: base)."""
    index = {n: i + 1 for i, n in enumerate(layer.adapters.by_name)}
    layer.adapters.rows.assign(np.array([index.get(n, 0) for n in names], "int32"))


def check_beside(layer, init: str) -> None:
    """Raise `ValueError` if an adapter started by `init` cannot be added
    to `layer`, a `LoraLayer` holding adapters already."""
    if LoraSettings(init=init).rewrites_kernel or layer.adapters.first.rewrites_kernel:
        raise ValueError(
            f"Cannot add an adapter to layer '{layer.name}' (adapters "
            f"{list(layer.adapters.names)}; init={init!r}): {_ALONE}"
        )


def new_adapter(layer, name: str, settings: LoraSettings, first: bool) -> Adapter:
    """Create adapter `name`'s variables in `layer` and return its record.

    The one factory of adapter records. The factors are float32, named
    "lora_a"/"lora_b" for the `first` adapter and "lora_a_<name>"/... for
    later ones (the names adapter and model files use). They start as the
    layer says (`factor_initializers`: A kaiming-uniform or gaussian, B
    zero; an embedding's, PEFT's) and are created trainable (a TensorFlow
    variable made non-trainable is never watched by the gradient tape,
    whatever Keras's flag says later); the caller freezes inactive ones.
    A DoRA adapter gets its magnitude, a PiSSA/OLoRA one (first only) its
    initial factors and the residual kernel.

    Args:
        layer: the `LoraLayer`, its `split` set.
        name: the adapter's name.
        settings: its `LoraSettings`.
        first: whether it is the layer's first adapter.
    """
    split = layer.split
    suffix = "" if first else f"_{name}"
    dropout_layer = None
    if settings.dropout and layer.applies_dropout:
        dropout_layer = keras.layers.Dropout(settings.dropout, seed=settings.seed)
    if first:
        # Tracked under the name model files give it.
        layer.dropout_layer = dropout_layer
    elif dropout_layer is not None:
        # Tracked, so its seed state is part of the model's state.
        with _keras_internals.unlocked_tracker(layer):
            setattr(
                layer,
                f"_dropout_{name}".replace(".", "_").replace("-", "_"),
                dropout_layer,
            )
    a_init, b_init = layer.factor_initializers(settings)
    lora_a = layer.add_weight(
        name=f"lora_a{suffix}",
        shape=split.in_shape + (settings.rank,),
        initializer=a_init,
        dtype="float32",
    )
    lora_b = layer.add_weight(
        name=f"lora_b{suffix}",
        shape=(settings.rank,) + split.out_shape,
        initializer=b_init,
        dtype="float32",
    )
    variant = LORA
    if settings.use_dora:
        magnitude = dora.add_magnitude(
            layer, f"{dora.MAGNITUDE}{suffix}", lora_a, lora_b, settings.scale
        )
        variant = dora.Dora(magnitude)
    adapter = Adapter(name, settings, lora_a, lora_b, dropout_layer, variant)
    if settings.rewrites_kernel:
        adapter.initial = initialize_from_kernel(layer, adapter)
    return adapter


def add_adapter(layer, name: str, **settings) -> Adapter:
    """Give `layer` (a `LoraLayer`) another adapter, inactive.

    Args:
        layer: a `LoraLayer`.
        name: the new adapter's name.
        **settings: `LoraSettings` fields (rank, alpha, dropout, ...).
    """
    settings = LoraSettings(**settings)
    if settings.rewrites_kernel or layer.adapters.first.rewrites_kernel:
        # The caller checks first (`check_beside`); this is the last guard.
        raise ValueError(f"Layer '{layer.name}': {_ALONE}")
    if settings.use_dora:
        dora.check_base(layer.original_layer, layer.split, settings.init)
    adapter = new_adapter(layer, name, settings, first=False)
    layer.adapters.by_name[name] = adapter
    # Several adapters: the active set becomes state the call reads.
    ensure_controls(layer)
    return adapter


def remove_adapter(layer, name: str) -> None:
    """Drop adapter `name` from `layer`, which keeps at least one other.

    Removing the first adapter makes the next one the first: the layer's
    `lora_a`, `lora_b`, `rank`, ... then describe it.
    """
    state = layer.adapters
    adapter = state.by_name.pop(name)
    for variable in adapter.variables:
        _keras_internals.untrack_variable(layer, variable)
    if state.gates is not None:
        ensure_controls(layer)  # One gate fewer.
    state.active = tuple(n for n in state.active if n != name)
    if state.first.name == name:
        state.first = state.by_name[next(iter(state.by_name))]


def apply(layer, inputs, outputs, training=None):
    """`outputs` plus the update of every active adapter (or per row)."""
    state = layer.adapters
    if state.gates is None:  # Never switched: the Python active set.
        return _apply_active(layer, inputs, outputs, training)
    adapters = list(state.by_name.values())
    if state.batching:
        # (batch, adapters): row i's one-hot choice (slot 0, the base, drops).
        weights = ops.one_hot(state.rows, len(adapters) + 1, dtype="float32")
        weights = weights[:, 1:]
    else:
        weights = state.gates
    # A PiSSA/OLoRA kernel is the residual (its adapter is the layer's only
    # one): where that adapter is off, the initial update goes back in.
    off = ops.subtract(1.0, weights[..., :1])
    outputs = state.first.initial.add_back(layer, inputs, outputs, off)
    base = outputs  # DoRA rescales the base output, not other adapters'.
    fused = [i for i, a in enumerate(adapters) if a.variant.fusable]
    for i, adapter in enumerate(adapters):
        if not adapter.variant.fusable:  # Refused in a mixed batch.
            update = adapter.update(layer, inputs, base, training)
            outputs = ops.add(outputs, update * ops.cast(weights[i], update.dtype))
    if not fused:
        return outputs
    if training and any(adapters[i].dropout_layer is not None for i in fused):
        # Each adapter drops its own input: one path per adapter.
        for i in fused:
            update = adapters[i].update(layer, inputs, base, training)
            outputs = ops.add(outputs, update * ops.cast(weights[i], update.dtype))
        return outputs
    if len(fused) < len(adapters):
        weights = ops.take(weights, ops.convert_to_tensor(fused, "int32"), axis=-1)
    fused_adapters = [adapters[i] for i in fused]
    return ops.add(outputs, gated_update(layer, inputs, fused_adapters, weights))


def _apply_active(layer, inputs, outputs, training):
    """`apply` for a layer never switched: its active set is Python state."""
    state = layer.adapters
    if state.disabled or state.first.name not in state.active:
        # A PiSSA/OLoRA kernel is the residual: the base model adds back
        # the initial update (its adapter is the layer's only one).
        outputs = state.first.initial.add_back(layer, inputs, outputs)
    if state.disabled:
        return outputs
    base = outputs  # DoRA rescales the base output, not other adapters'.
    for name in state.active:
        outputs = ops.add(outputs, state[name].update(layer, inputs, base, training))
    return outputs


def check_batchable(layer) -> None:
    """Raise `ValueError` if `layer` holds an adapter whose path cannot run
    fused (DoRA): no mixed batch."""
    alone = [a.name for a in layer.adapters.by_name.values() if not a.variant.fusable]
    if alone:
        raise ValueError(
            f"Layer '{layer.name}' holds DoRA adapters {alone}; "
            "adapter_batch mixes LoRA adapters without DoRA only (DoRA rescales "
            "the whole output per adapter). Run each DoRA adapter's rows "
            "in their own batch, with `set_adapter`."
        )


def gated_update(layer, inputs, adapters, weights):
    """The adapters' updates weighted by `weights`, in one pass.

    The factors concatenate along the rank in a fixed order (A: fan_in x
    sum of ranks, B: sum of ranks x fan_out); each rank column is scaled
    by its adapter's `scale * weight` between the two matmuls. `weights`
    is `(adapters,)` (the gates: which adapters are active) or `(batch,
    adapters)` (a mixed batch: each row's one-hot choice). No loop over
    adapters runs in the graph and no Python state picks the adapters, so
    a trace serves every choice. Inactive adapters cost their share of
    rank: small beside the wrapped kernel.
    """
    ranks = [a.rank for a in adapters]
    owner = np.repeat(np.arange(len(adapters)), ranks)
    scales = np.repeat([a.scale for a in adapters], ranks)
    columns = ops.take(weights, ops.convert_to_tensor(owner, "int32"), axis=-1)
    columns = ops.multiply(columns, ops.convert_to_tensor(scales, "float32"))
    return project(layer, inputs, adapters, ops.cast(columns, layer.compute_dtype))


def names_in(layers) -> dict:
    """Adapter names over `layers`, in order of first appearance."""
    names = {}
    for layer in layers:
        names.update(dict.fromkeys(layer.adapters.names))
    return names
