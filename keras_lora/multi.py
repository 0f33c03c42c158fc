"""Several adapters in one `LoraLayer`: their records, state and math.

A `LoraLayer` holds its adapters in an `AdapterState`: the first one is the
layer's own `lora_a`/`lora_b` (paths ".../query/lora_a"), later ones add
factors named ".../query/lora_a_<name>". While the first adapter is the only
active one, `LoraLayer.call` takes its plain path (reshape and two matmuls);
every other case (several active adapters, LoRA disabled, a mixed batch)
runs `apply` here. The public functions are in `keras_lora.adapters`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import keras
from keras import ops

from keras_lora import dora
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


@dataclass
class BatchPlan:
    """Stacked factors of one layer for a mixed batch.

    Slot 0 is the base model (zero factors); slot k+1 is `names[k]`. Ranks
    are zero-padded to the largest, and each adapter's scale is folded into
    its B, so padding adds exact zeros.
    """

    rows: object  # int32 (batch,): each row's slot.
    lora_a: object  # (slots, fan_in, max_rank)
    lora_b: object  # (slots, max_rank, fan_out)


@dataclass
class AdapterState:
    """The adapters of one layer, which are active, and the call mode."""

    first: Adapter
    by_name: dict = field(default_factory=dict)
    active: tuple = ()
    disabled: bool = False
    batch: BatchPlan | None = None

    def __post_init__(self):
        self.by_name = {self.first.name: self.first}
        self.active = (self.first.name,)

    def __getitem__(self, name: str) -> Adapter:
        return self.by_name[name]

    def __contains__(self, name) -> bool:
        return name in self.by_name

    @property
    def names(self) -> tuple:
        return tuple(self.by_name)

    @property
    def plain(self) -> bool:
        """Whether the call is the first adapter's alone (the fast path)."""
        return (
            not self.disabled
            and self.batch is None
            and self.active == (self.first.name,)
        )


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
    lora_a = layer.add_weight(
        name=f"lora_a_{name}",
        shape=split.in_shape + (rank,),
        initializer=a_initializer(init, split.fan_in, rank, seed),
        dtype="float32",
    )
    lora_b = layer.add_weight(
        name=f"lora_b_{name}",
        shape=(rank,) + split.out_shape,
        initializer="zeros",
        dtype="float32",
    )
    dropout_layer = None
    if dropout:
        dropout_layer = keras.layers.Dropout(dropout, seed=seed)
        # Tracked, so its seed state is part of the model's state.
        locked = layer._tracker.locked
        layer._tracker.unlock()
        setattr(
            layer, f"_dropout_{name}".replace(".", "_").replace("-", "_"), dropout_layer
        )
        if locked:
            layer._tracker.lock()
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
    return adapter


def remove_adapter(layer, name: str) -> None:
    """Drop adapter `name` from `layer`, which keeps at least one other.

    Removing the first adapter makes the next one the first: the layer's
    `lora_a`, `lora_b`, `rank`, ... then describe it.
    """
    state = layer.adapters
    adapter = state.by_name.pop(name)
    for variable in adapter.variables:
        layer._untrack_variable(variable)
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
    if state.batch is not None:
        return ops.add(outputs, batched_update(layer, inputs, state.batch))
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


def batch_plan(layer, names, rows) -> BatchPlan:
    """Stack `layer`'s adapters `names` for rows `rows` (slots, see `BatchPlan`)."""
    split = layer.split
    adapters = [layer.adapters[n] for n in names if n in layer.adapters]
    dora_names = [a.name for a in adapters if a.magnitude is not None]
    if dora_names:
        raise ValueError(
            f"Layer '{layer.name}' holds DoRA adapters {dora_names}; "
            "adapter_batch mixes plain LoRA adapters only (DoRA rescales "
            "the whole output per adapter). Run each DoRA adapter's rows "
            "in their own batch, with `set_adapter`."
        )
    max_rank = max([a.rank for a in adapters] or [1])
    a_slots = [ops.zeros((split.fan_in, max_rank), "float32")]
    b_slots = [ops.zeros((max_rank, split.fan_out), "float32")]
    initial = layer.adapters.first.initial
    if initial is not None:
        # The base of a PiSSA/OLoRA kernel (the residual) is the residual
        # plus the initial update (same rank as the adapter's, the only
        # one on this layer).
        a_slots = [ops.reshape(initial.lora_a.value, (split.fan_in, max_rank))]
        b = ops.reshape(initial.lora_b.value, (max_rank, split.fan_out))
        b_slots = [b * initial.scale]
    for name in names:
        if name not in layer.adapters:  # Not on this layer: the base.
            a_slots.append(a_slots[0])
            b_slots.append(b_slots[0])
            continue
        adapter = layer.adapters[name]
        pad = max_rank - adapter.rank
        a = ops.reshape(adapter.lora_a.value, (split.fan_in, adapter.rank))
        b = ops.reshape(adapter.lora_b.value, (adapter.rank, split.fan_out))
        a_slots.append(ops.pad(a, ((0, 0), (0, pad))))
        b_slots.append(ops.pad(b * adapter.scale, ((0, pad), (0, 0))))
    return BatchPlan(rows, ops.stack(a_slots), ops.stack(b_slots))


def batched_update(layer, inputs, plan: BatchPlan):
    """Each row's own adapter update, in one pass: gather and batched matmuls."""
    split = layer.split
    rows, batch = plan.rows.shape[0], inputs.shape[0]
    if batch is not None and batch != rows:
        raise ValueError(
            f"adapter_batch was given {rows} adapter names, but layer "
            f"'{layer.name}' got a batch of {batch} rows. Pass one name (or "
            "None) per row."
        )
    x = inputs
    input_perm, num_batch_axes, output_perm = split.call_plan(len(x.shape))
    if input_perm:
        x = ops.transpose(x, input_perm)
    batch_shape = tuple(ops.shape(x)[:num_batch_axes])
    x = ops.reshape(x, (batch_shape[0], -1, split.fan_in))
    dtype = layer.compute_dtype
    lora_a = ops.cast(ops.take(plan.lora_a, plan.rows, axis=0), dtype)
    lora_b = ops.cast(ops.take(plan.lora_b, plan.rows, axis=0), dtype)
    x = ops.matmul(ops.matmul(x, lora_a), lora_b)  # (batch, tokens, fan_out)
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
