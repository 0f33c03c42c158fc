"""`LoraLayer`: a frozen Dense/EinsumDense plus a trainable low-rank update."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_lora import _keras_internals, adapter_state, dora, initialization
from keras_lora.kernel_split import KernelSplit, split_kernel
from keras_lora.quantized import check_quantization_mode, float_policy, kernel_path


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraLayer(keras.layers.Layer):
    """Wraps a built `Dense` or `EinsumDense` layer with a LoRA update.

    The output is `activation(original(x) + scale * B(A(dropout(x))))` with
    `scale = alpha / rank`: the update goes in before the wrapped layer's
    activation (keras-hub's feed-forward `Dense` carries a GELU), which moves
    to this wrapper while the layer is wrapped and goes back on
    `merge_lora`.

    A maps every input feature the kernel contracts to `rank` and B maps
    `rank` to every output feature, whatever the order of the kernel's axes
    (see `keras_lora.kernel_split`). By default A starts kaiming-uniform,
    as in the reference LoRA implementation, and B at zero, so a fresh
    adapter changes no output; `init` picks another start (see
    `keras_lora.initialization`): `"gaussian"`, or `"pissa"` /
    `"pissa_niter_K"` / `"olora"`, which move the kernel's principal part
    into A and B and leave the residual in the kernel (the output is
    unchanged; the layer keeps the initial factors, frozen, to save and
    export the adapter for the original kernel). Both factors are float32
    under every dtype policy and are created here, when the layer is
    wrapped: never lazily inside a traced `fit`. The wrapped kernel and
    bias are frozen.

    Args:
        original_layer: a built `keras.layers.Dense` or
            `keras.layers.EinsumDense`.
        rank: rank of the update, a positive integer.
        alpha: scaling numerator, a positive number; the update is scaled
            by `alpha / rank` (or `alpha / sqrt(rank)` with `use_rslora`).
        dropout: dropout rate on the LoRA path's input, in [0, 1).
        use_rslora: scale by `alpha / sqrt(rank)` (rank-stabilised LoRA).
        seed: seed for A's initialisation and the dropout.
        init: how the factors start: `"kaiming"` (default), `"gaussian"`,
            `"pissa"`, `"pissa_niter_K"` (randomised SVD, K iterations) or
            `"olora"`, as PEFT's `init_lora_weights`.
        use_dora: add DoRA's trainable magnitude per output feature
            (`keras_lora.dora`): the output becomes
            `m / ||W + s·A·B|| * (x·(W + s·A·B)) + bias`, as PEFT's
            `use_dora=True`. Not over a quantized kernel.
        adapter_name: the name of this first adapter; more are added with
            `inject_lora(..., adapter_name=...)` (see `keras_lora.switching`).
            `lora_a`, `lora_b`, `rank`, `alpha` and `scale` always describe
            the first adapter the layer holds.
        **kwargs: base `Layer` arguments; `name` defaults to the wrapped
            layer's name and `dtype` to its dtype policy.

    Example:

    >>> dense = keras.layers.Dense(3)
    >>> dense.build((None, 8))
    >>> lora = LoraLayer(dense, rank=2, alpha=4.0)
    >>> tuple(lora.lora_a.shape), tuple(lora.lora_b.shape)
    ((8, 2), (2, 3))
    >>> x = keras.random.normal((5, 8))
    >>> bool(ops.all(lora(x) == dense(x)))  # B starts at zero.
    True
    """

    def __init__(
        self,
        original_layer: keras.layers.Layer,
        rank: int = 4,
        alpha: float = 32.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        seed: int | None = None,
        adapter_name: str = "default",
        init: str = "kaiming",
        use_dora: bool = False,
        **kwargs,
    ):
        check_wrappable(original_layer)
        check_hyperparameters(rank, alpha, dropout)
        adapter_state.check_adapter_name(adapter_name)
        initialization.check_layer_init(
            original_layer, split_kernel(original_layer), init, rank
        )
        if use_dora:
            dora.check_base(original_layer, split_kernel(original_layer), init)
        kwargs.setdefault("name", original_layer.name)
        # A quantized layer's policy ("int8_from_float32") would send the
        # wrapper to a quantized call it does not have: the wrapper runs
        # under the float policy the kernel was quantized from, and the
        # wrapped layer keeps its own quantized call.
        kwargs.setdefault("dtype", float_policy(original_layer.dtype_policy))
        super().__init__(**kwargs)
        self.original_layer = original_layer
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.seed = seed
        self.scale = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.split: KernelSplit = split_kernel(original_layer)

        # The update must go in before the activation: the wrapper applies
        # it, and the wrapped layer computes its linear part only.
        self.activation = original_layer.activation
        original_layer.activation = keras.activations.linear
        original_layer.trainable = False

        self.dropout_layer = (
            keras.layers.Dropout(self.dropout, seed=seed) if self.dropout else None
        )
        # Name the factors after the kernel ("block/query/kernel" gives
        # "block/query/lora_a"): paths stay unique in the model, which the
        # torch module registry, layout maps and adapter files rely on.
        # Keras prefixes a weight's path with the layer's `_parent_path`;
        # without it every block's factors would be "query/lora_a". The
        # stored kernel variable gives the path (an int4 layer's `kernel`
        # is a computed tensor with no path).
        layer_path = kernel_path(original_layer).rpartition("/")[0]
        _keras_internals.set_weight_path_prefix(self, layer_path.rpartition("/")[0])
        self.init = init
        self.lora_a = self.add_weight(
            name="lora_a",
            shape=self.split.in_shape + (self.rank,),
            initializer=initialization.a_initializer(
                init, self.split.fan_in, self.rank, seed
            ),
            dtype="float32",
        )
        self.lora_b = self.add_weight(
            name="lora_b",
            shape=(self.rank,) + self.split.out_shape,
            initializer="zeros",
            dtype="float32",
        )
        magnitude = None
        if use_dora:
            magnitude = dora.add_magnitude(
                self, dora.MAGNITUDE, self.lora_a, self.lora_b, self.scale
            )
        self.adapter_name = adapter_name
        # Every adapter's factors and settings, the first one's included;
        # the state of several adapters lives in `keras_lora.adapter_state`.
        self.adapters = adapter_state.AdapterState(
            adapter_state.Adapter(
                adapter_name,
                self.lora_a,
                self.lora_b,
                self.rank,
                self.alpha,
                self.dropout,
                self.use_rslora,
                seed,
                self.scale,
                self.dropout_layer,
                init,
                magnitude=magnitude,
            )
        )
        if initialization.rewrites_kernel(init):
            first = self.adapters.first
            a0, b0 = initialization.initialize_from_kernel(self, first)
            first.initial = adapter_state.Adapter(
                adapter_name, a0, b0, self.rank, self.alpha, 0.0,
                self.use_rslora, seed, self.scale,
            )  # fmt: skip
        self.built = True

    def call(self, inputs, training=None):
        # The wrapped layer may have been quantized after wrapping.
        check_quantization_mode(self.original_layer)
        outputs = self.original_layer(inputs, training=training)
        if self.adapters.plain and not self.use_dora:
            # One adapter, active: the fast path.
            outputs = ops.add(outputs, self.lora_update(inputs, training=training))
        else:
            outputs = adapter_state.apply(self, inputs, outputs, training)
        return self.activation(outputs)

    def lora_update(self, inputs, training=None, adapter=None):
        """`scale * B(A(dropout(inputs)))`, shaped like the layer's output.

        `adapter` (a `keras_lora.adapter_state.Adapter` of this layer) picks another
        adapter's factors; by default, the first adapter's.
        """
        if adapter is None:
            lora_a, lora_b = self.lora_a, self.lora_b
            rank, scale, dropout_layer = self.rank, self.scale, self.dropout_layer
        else:
            lora_a, lora_b = adapter.lora_a, adapter.lora_b
            rank, scale, dropout_layer = (
                adapter.rank,
                adapter.scale,
                adapter.dropout_layer,
            )
        x = inputs
        if dropout_layer is not None:
            x = dropout_layer(x, training=training)
        input_perm, num_batch_axes, output_perm = self.split.call_plan(len(x.shape))
        if input_perm:
            x = ops.transpose(x, input_perm)
        batch_shape = tuple(ops.shape(x)[:num_batch_axes])
        x = ops.reshape(x, (-1, self.split.fan_in))
        # The factors are float32; the path runs in the compute dtype. Under
        # a mixed policy Keras's autocast already casts them (this is a
        # no-op), but under a full half-precision policy the compute and
        # variable dtypes match, Keras does not autocast, and float32
        # factors would silently run the path in float32.
        lora_a = ops.cast(lora_a, self.compute_dtype)
        lora_b = ops.cast(lora_b, self.compute_dtype)
        lora_a = ops.reshape(lora_a, (self.split.fan_in, rank))
        lora_b = ops.reshape(lora_b, (rank, self.split.fan_out))
        # Scale the (tokens, rank) product: the smallest tensor on the path.
        x = ops.matmul(ops.matmul(x, lora_a) * scale, lora_b)
        x = ops.reshape(x, batch_shape + self.split.out_shape)
        if output_perm:
            x = ops.transpose(x, output_perm)
        return x

    def delta(self, adapter_name: str | None = None, adapter=None):
        """`scale * A·B` in float32, shaped like the wrapped kernel.

        `adapter_name` picks an adapter (or `adapter`, a record); by
        default, the first one.
        """
        if adapter is None:
            adapter = self.adapters[adapter_name or self.adapter_name]
        update = ops.einsum(
            self.split.delta_equation(),
            ops.convert_to_tensor(adapter.lora_a.value, "float32"),
            ops.convert_to_tensor(adapter.lora_b.value, "float32"),
        )
        return update * adapter.scale

    def initial_delta(self):
        """`scale * A0·B0` in float32 for a PiSSA/OLoRA adapter (what the
        wrapped kernel lacks from the original one), else `None`."""
        initial = self.adapters.first.initial
        if initial is None:
            return None
        return self.delta(adapter=initial)

    @property
    def use_dora(self) -> bool:
        """Whether the first adapter is DoRA (has a magnitude)."""
        return self.adapters.first.magnitude is not None

    @property
    def lora_magnitude(self):
        """The first adapter's DoRA magnitude, or None."""
        return self.adapters.first.magnitude

    def lora_variables(self, active_only: bool = False) -> list:
        """The factors of every adapter (or of the active ones only)."""
        names = self.adapters.active if active_only else self.adapters.names
        return [v for n in names for v in self.adapters[n].variables]

    def added_variables(self) -> list:
        """Every variable the wrapper adds to the model: the factors, and
        the frozen initial factors of a PiSSA/OLoRA adapter."""
        initial = self.adapters.first.initial
        extra = list(initial.variables) if initial is not None else []
        return self.lora_variables() + extra

    def compute_output_shape(self, input_shape):
        return self.original_layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        original = keras.saving.serialize_keras_object(self.original_layer)
        # Serialise the wrapped layer as it was before wrapping.
        original["config"]["activation"] = keras.activations.serialize(self.activation)
        original["config"]["trainable"] = True
        config.update(
            original_layer=original,
            original_build_config=self.original_layer.get_build_config(),
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            use_rslora=self.use_rslora,
            seed=self.seed,
            adapter_name=self.adapter_name,
            init=self.init,
            use_dora=self.use_dora,
        )
        config.update(self._adapters_config())
        return config

    def _adapters_config(self) -> dict:
        # Later adapters and the active set: without them a reloaded model
        # would miss the other adapters' variables. Listed in the order
        # their variables were made, which is the order Keras saves them.
        # (A first adapter promoted by `delete_adapter` comes back with its
        # factors named "lora_a"/"lora_b", as a first adapter's are.)
        state = self.adapters
        later = [a for a in state.by_name.values() if a is not state.first]
        config = {}
        if later:
            config["more_adapters"] = [self._later_adapter_config(a) for a in later]
        if later or state.active != (self.adapter_name,):
            config["active_adapters"] = list(state.active)
        return config

    @staticmethod
    def _later_adapter_config(adapter) -> dict:
        """`adapter_state.add_adapter`'s settings that recreate `adapter`."""
        return dict(
            name=adapter.name,
            rank=adapter.rank,
            alpha=adapter.alpha,
            dropout=adapter.dropout,
            use_rslora=adapter.use_rslora,
            seed=adapter.seed,
            init=adapter.init,
            use_dora=adapter.magnitude is not None,
        )

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        original = keras.saving.deserialize_keras_object(config.pop("original_layer"))
        build_config = config.pop("original_build_config", None)
        more = config.pop("more_adapters", [])
        active = config.pop("active_adapters", None)
        if build_config and not original.built:
            original.build_from_config(build_config)
        layer = cls(original, **config)
        for settings in more:
            settings = dict(settings)
            adapter_state.add_adapter(layer, settings.pop("name"), **settings)
        if active is not None:
            layer.adapters.active = tuple(active)
        # Only the active adapters train, as `set_adapter` left them.
        trainable = {id(v) for v in layer.lora_variables(active_only=True)}
        for variable in layer.lora_variables():
            variable.trainable = id(variable) in trainable
        return layer

    def unwrap(self) -> keras.layers.Layer:
        """Give the wrapped layer its activation back and return it."""
        self.original_layer.activation = self.activation
        return self.original_layer


def check_hyperparameters(rank, alpha, dropout) -> None:
    """Raise `ValueError` for a rank, alpha or dropout LoRA cannot use."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(
            f"`rank` must be a positive integer (e.g. rank=4). Received: rank={rank!r}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(
            "`alpha` must be a positive number (the update is scaled by "
            f"alpha / rank; e.g. alpha=32.0). Received: alpha={alpha!r}"
        )
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(
            "`dropout` must be a rate in [0, 1) (0 disables it). "
            f"Received: dropout={dropout!r}"
        )


def check_wrappable(layer) -> None:
    """Raise `ValueError` unless `layer` is a built, plain Dense/EinsumDense."""
    if isinstance(layer, LoraLayer):
        raise ValueError(
            f"Layer '{layer.name}' is already wrapped by a LoraLayer. Call "
            "`merge_lora(model)` first, or leave it out of `targets`."
        )
    if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        raise ValueError(
            f"Layer '{getattr(layer, 'name', layer)}' is a "
            f"{type(layer).__name__}; LoraLayer wraps only keras.layers.Dense "
            "and keras.layers.EinsumDense. Leave it out of `targets`."
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built, so its kernel shape is "
            "unknown. Build the model first (call it on a batch of data, or "
            "`model.build(input_shape)`), then add LoRA."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has Keras's built-in LoRA enabled "
            "(`enable_lora`). Use one or the other: build the layer without "
            "`enable_lora` to wrap it with keras_lora."
        )
    check_quantization_mode(layer)
    split_kernel(layer)  # Raises for an equation LoRA cannot factor.
