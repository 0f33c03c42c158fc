"""Several adapters in one `LoraLayer`: their records, state and math.

A `LoraLayer` holds its adapters in an `AdapterState`: the first one is the
layer's own `lora_a`/`lora_b` (paths ".../query/lora_a"), later ones add
factors named ".../query/lora_a_<name>". While the layer has one adapter
and was never switched, `LoraLayer.call` takes its plain path (reshape and
two matmuls); every other case (several adapters, LoRA disabled, a mixed
batch) runs `apply` here, which reads the choice of adapters from
variables so that switching never traces the model again. The public
functions are in `keras_lora.switching`.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from keras_lora import _keras_internals, dora
from keras_lora.initialization import a_initializer, check_init, rewrites_kernel

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


@dataclass
class Adapter:
    """One adapter's factors and settings inside a `LoraLayer`."""

    name: str
    lora_a: keras.Variable
    lora_b: keras.Variable
    rank: int
    alpha: float
    dropout: float
    use_rslora: bool
    seed: int | None
    scale: float
    dropout_layer: keras.layers.Layer | None = None
    # How the factors started (`keras_lora.initialization`).
    init: str = "kaiming"
    # PiSSA/OLoRA: the frozen initial factors, as an adapter record (same
    # rank and scale, no dropout); the wrapped kernel is the original
    # minus their update.
    initial: Adapter | None = None
    magnitude: keras.Variable | None = None  # DoRA's (see `keras_lora.dora`).

    @property
    def variables(self) -> tuple:
        if self.magnitude is not None:
            return (self.lora_a, self.lora_b, self.magnitude)
        return (self.lora_a, self.lora_b)


class AdapterState:
    """The adapters of one layer, which are active, and the call mode.

    Until a layer's adapters are first switched (`set_adapter`,
    `disable_lora`, `adapter_batch`, or a second adapter), the active set
    is Python state and the first adapter alone takes the layer's plain
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
    def plain(self) -> bool:
        """Whether the call is the first adapter's alone (the fast path)."""
        return (
            self.gates is None
            and not self._disabled
            and self._active == (self.first.name,)
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
    if rewrites_kernel(check_init(init)) or layer.adapters.first.initial is not None:
        raise ValueError(
            f"Cannot add an adapter to layer '{layer.name}' (adapters "
            f"{list(layer.adapters.names)}; init={init!r}): {_ALONE}"
        )


def add_adapter(
    layer,
    name: str,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    seed: int | None = None,
    init: str = "kaiming",
    use_dora: bool = False,
) -> Adapter:
    """Give `layer` (a `LoraLayer`) another adapter's factors.

    A is kaiming-uniform (or gaussian, see `keras_lora.initialization`) and
    B zero. They are created trainable (a TensorFlow variable made
    non-trainable is never watched by the gradient tape, whatever Keras's
    flag says later); the caller freezes the inactive ones.
    """
    split = layer.split
    if rewrites_kernel(check_init(init)) or layer.adapters.first.initial is not None:
        # The caller checks first (`check_beside`); this is the last guard.
        raise ValueError(f"Layer '{layer.name}': {_ALONE}")
    if use_dora:
        dora.check_base(layer.original_layer, split)
    # A layer may start its factors its own way (an embedding: PEFT's A
    # zeros, B normal; see `keras_lora.embedding`).
    initializers = getattr(layer, "factor_initializers", None)
    if initializers is not None:
        a_init, b_init = initializers(seed)
    else:
        a_init, b_init = a_initializer(init, split.fan_in, rank, seed), "zeros"
    lora_a = layer.add_weight(
        name=f"lora_a_{name}",
        shape=split.in_shape + (rank,),
        initializer=a_init,
        dtype="float32",
    )
    lora_b = layer.add_weight(
        name=f"lora_b_{name}",
        shape=(rank,) + split.out_shape,
        initializer=b_init,
        dtype="float32",
    )
    dropout_layer = None
    if dropout:
        dropout_layer = keras.layers.Dropout(dropout, seed=seed)
        # Tracked, so its seed state is part of the model's state.
        with _keras_internals.unlocked_tracker(layer):
            setattr(
                layer,
                f"_dropout_{name}".replace(".", "_").replace("-", "_"),
                dropout_layer,
            )
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    magnitude = None
    if use_dora:
        magnitude = dora.add_magnitude(
            layer, f"{dora.MAGNITUDE}_{name}", lora_a, lora_b, scale
        )
    adapter = Adapter(
        name, lora_a, lora_b, int(rank), float(alpha), float(dropout),
        bool(use_rslora), seed, scale, dropout_layer, init, magnitude=magnitude,
    )  # fmt: skip
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
        first = state.by_name[next(iter(state.by_name))]
        state.first = first
        layer.adapter_name = first.name
        object.__setattr__(layer, "lora_a", first.lora_a)
        object.__setattr__(layer, "lora_b", first.lora_b)
        layer.rank, layer.alpha, layer.dropout = first.rank, first.alpha, first.dropout
        layer.use_rslora, layer.seed, layer.scale = (
            first.use_rslora,
            first.seed,
            first.scale,
        )
        layer.init = first.init
        object.__setattr__(layer, "dropout_layer", first.dropout_layer)


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
    initial = state.first.initial
    if initial is not None:
        # A PiSSA/OLoRA kernel is the residual (its adapter is the layer's
        # only one): where that adapter is off, add the initial update back.
        off = ops.subtract(1.0, weights[..., :1])
        outputs = ops.add(outputs, gated_update(layer, inputs, [initial], off))
    base = outputs  # DoRA rescales the base output, not other adapters'.
    plain = [i for i, a in enumerate(adapters) if a.magnitude is None]
    for i, adapter in enumerate(adapters):
        if adapter.magnitude is not None:  # Refused in a mixed batch.
            update = dora.update(layer, adapter, inputs, base, training)
            outputs = ops.add(outputs, update * ops.cast(weights[i], update.dtype))
    if not plain:
        return outputs
    if training and any(adapters[i].dropout_layer is not None for i in plain):
        # Each adapter drops its own input: one path per adapter.
        for i in plain:
            update = layer.lora_update(inputs, training=training, adapter=adapters[i])
            outputs = ops.add(outputs, update * ops.cast(weights[i], update.dtype))
        return outputs
    if len(plain) < len(adapters):
        weights = ops.take(weights, ops.convert_to_tensor(plain, "int32"), axis=-1)
    plain_adapters = [adapters[i] for i in plain]
    return ops.add(outputs, gated_update(layer, inputs, plain_adapters, weights))


def _apply_active(layer, inputs, outputs, training):
    """`apply` for a layer never switched: its active set is Python state."""
    state = layer.adapters
    initial = state.first.initial
    if initial is not None and (state.disabled or state.first.name not in state.active):
        # A PiSSA/OLoRA kernel is the residual: the base model adds back
        # the initial update (its adapter is the layer's only one).
        outputs = ops.add(outputs, layer.lora_update(inputs, adapter=initial))
    if state.disabled:
        return outputs
    base = outputs  # DoRA rescales the base output, not other adapters'.
    for name in state.active:
        adapter = state[name]
        if adapter.magnitude is not None:
            update = dora.update(layer, adapter, inputs, base, training)
        else:
            update = layer.lora_update(inputs, training=training, adapter=adapter)
        outputs = ops.add(outputs, update)
    return outputs


def check_batchable(layer) -> None:
    """Raise `ValueError` if `layer` holds a DoRA adapter (no mixed batch)."""
    dora_names = [
        a.name for a in layer.adapters.by_name.values() if a.magnitude is not None
    ]
    if dora_names:
        raise ValueError(
            f"Layer '{layer.name}' holds DoRA adapters {dora_names}; "
            "adapter_batch mixes plain LoRA adapters only (DoRA rescales "
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
    split = layer.split
    dtype = layer.compute_dtype
    per_row = len(weights.shape) == 2
    x = inputs
    input_perm, num_batch_axes, output_perm = split.call_plan(len(x.shape))
    if input_perm:
        x = ops.transpose(x, input_perm)
    batch_shape = tuple(ops.shape(x)[:num_batch_axes])
    if per_row:
        rows, batch = weights.shape[0], x.shape[0]
        if batch is not None and rows is not None and batch != rows:
            raise ValueError(
                f"adapter_batch was given {rows} adapter names, but layer "
                f"'{layer.name}' got a batch of {batch} rows. Pass one name "
                "(or None) per row."
            )
        x = ops.reshape(x, (batch_shape[0], -1, split.fan_in))
    else:
        x = ops.reshape(x, (-1, split.fan_in))
    lora_a = ops.concatenate(
        [
            ops.reshape(ops.cast(a.lora_a, dtype), (split.fan_in, a.rank))
            for a in adapters
        ],
        axis=1,
    )
    lora_b = ops.concatenate(
        [
            ops.reshape(ops.cast(a.lora_b, dtype), (a.rank, split.fan_out))
            for a in adapters
        ],
        axis=0,
    )
    owner = np.repeat(np.arange(len(adapters)), [a.rank for a in adapters])
    scales = np.repeat([a.scale for a in adapters], [a.rank for a in adapters])
    columns = ops.take(weights, ops.convert_to_tensor(owner, "int32"), axis=-1)
    columns = ops.multiply(columns, ops.convert_to_tensor(scales, "float32"))
    columns = ops.cast(columns, dtype)
    if per_row:
        columns = ops.expand_dims(columns, 1)  # (batch, 1, rank): per row.
    x = ops.matmul(ops.matmul(x, lora_a) * columns, lora_b)
    x = ops.reshape(x, batch_shape + split.out_shape)
    if output_perm:
        x = ops.transpose(x, output_perm)
    return x


def names_in(layers) -> dict:
    """Adapter names over `layers`, in order of first appearance."""
    names = {}
    for layer in layers:
        names.update(dict.fromkeys(layer.adapters.names))
    return names
