"""`LoraLayer`: a frozen Dense/EinsumDense plus a trainable low-rank update."""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from keras_lora import _keras_internals, adapter_state, dora, low_rank
from keras_lora.initialization import a_initializer, check_layer_init
from keras_lora.kernel_split import KernelSplit, split_kernel
from keras_lora.quantized import check_quantization_mode, float_policy, kernel_path
from keras_lora.settings import LoraSettings, SettingsAttributes


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraLayer(SettingsAttributes, keras.layers.Layer):
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
            `lora_a`, `lora_b`, `rank`, `alpha`, `scale`, `dropout`, ...
            read the first adapter the layer holds (its record in
            `adapters`, see `keras_lora.adapter_record`).
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

    # Whether adapters get a dropout layer (an embedding's path has none).
    applies_dropout = True

    def __init__(
        self,
        original_layer: keras.layers.Layer,
        rank: int = LoraSettings.rank,
        alpha: float = LoraSettings.alpha,
        dropout: float = LoraSettings.dropout,
        use_rslora: bool = LoraSettings.use_rslora,
        seed: int | None = LoraSettings.seed,
        adapter_name: str = "default",
        init: str = LoraSettings.init,
        use_dora: bool = LoraSettings.use_dora,
        **kwargs,
    ):
        split = self.check_layer(original_layer)
        settings = LoraSettings(
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            seed=seed,
            init=init,
            use_dora=use_dora,
        )
        adapter_state.check_adapter_name(adapter_name)
        self.check_settings(original_layer, split, settings)
        kwargs.setdefault("name", original_layer.name)
        # A quantized layer's policy ("int8_from_float32") would send the
        # wrapper to a quantized call it does not have: the wrapper runs
        # under the float policy the kernel was quantized from, and the
        # wrapped layer keeps its own quantized call.
        kwargs.setdefault("dtype", float_policy(original_layer.dtype_policy))
        super().__init__(**kwargs)
        self.original_layer = original_layer
        self.split: KernelSplit = split
        self.take_over(original_layer)
        original_layer.trainable = False
        # Name the factors after the kernel ("block/query/kernel" gives
        # "block/query/lora_a"): paths stay unique in the model, which the
        # torch module registry, layout maps and adapter files rely on.
        # Keras prefixes a weight's path with the layer's parent path;
        # without it every block's factors would be "query/lora_a". The
        # stored kernel variable gives the path (an int4 layer's `kernel`
        # is a computed tensor with no path).
        layer_path = kernel_path(original_layer).rpartition("/")[0]
        _keras_internals.set_weight_path_prefix(self, layer_path.rpartition("/")[0])
        # Every adapter's record, the first one's included; the state of
        # several adapters lives in `keras_lora.adapter_state`.
        self.adapters = adapter_state.AdapterState(
            adapter_state.new_adapter(self, adapter_name, settings, first=True)
        )
        self.built = True

    @staticmethod
    def check_layer(layer: keras.layers.Layer) -> KernelSplit:
        """Raise `ValueError` unless this class can wrap `layer`; return its
        split. Changes nothing.

        Args:
            layer: the layer to wrap.
        """
        return check_wrappable(layer)

    @staticmethod
    def check_settings(
        layer: keras.layers.Layer, split: KernelSplit, settings: LoraSettings
    ) -> None:
        """Raise `ValueError` unless `layer` can take an adapter with
        `settings`. Changes nothing.

        Args:
            layer: the layer to wrap.
            split: its split (`check_layer`'s result).
            settings: the adapter's settings.
        """
        check_layer_init(layer, split, settings.init, settings.rank)
        if settings.use_dora:
            dora.check_base(layer, split, settings.init)

    def take_over(self, original_layer: keras.layers.Layer) -> None:
        """Take what the wrapper applies from `original_layer`.

        Args:
            original_layer: the layer being wrapped.
        """
        # The update must go in before the activation: the wrapper applies
        # it, and the wrapped layer computes its linear part only.
        self.activation = original_layer.activation
        original_layer.activation = keras.activations.linear

    def factor_initializers(self, settings: LoraSettings) -> tuple:
        """A's and B's initializers for an adapter with `settings`.

        Args:
            settings: the adapter's settings (`init`, `rank`, `seed`).
        """
        return (
            a_initializer(
                settings.init, self.split.fan_in, settings.rank, settings.seed
            ),
            "zeros",
        )

    def call(self, inputs, training=None):
        # The wrapped layer may have been quantized after wrapping.
        check_quantization_mode(self.original_layer)
        outputs = self.original_layer(inputs, training=training)
        if self.adapters.fast_path:
            outputs = ops.add(outputs, self.lora_update(inputs, training=training))
        else:
            outputs = adapter_state.apply(self, inputs, outputs, training)
        return self.activation(outputs)

    def lora_update(self, inputs, training=None, adapter=None):
        """`scale * B(A(dropout(inputs)))`, shaped like the layer's output.

        `adapter` (a `keras_lora.adapter_record.Adapter` of this layer)
        picks another adapter's factors; by default, the first adapter's.
        """
        if adapter is None:
            adapter = self.adapters.first
        x = inputs
        if adapter.dropout_layer is not None:
            x = adapter.dropout_layer(x, training=training)
        return low_rank.project(self, x, [adapter], adapter.scale)

    def delta(self, adapter_name: str | None = None, adapter=None):
        """`scale * A·B` in float32, shaped like the wrapped kernel.

        `adapter_name` picks an adapter (or `adapter`, a record); by
        default, the first one.
        """
        if adapter is None:
            adapter = self.adapters[adapter_name or self.adapter_name]
        return low_rank.delta(self.split, adapter)

    def initial_delta(self):
        """`scale * A0·B0` in float32 for a PiSSA/OLoRA adapter (what the
        wrapped kernel lacks from the original one), else `None`."""
        return self.adapters.first.initial.delta(self.split)

    @property
    def settings(self) -> LoraSettings:
        """The first adapter's settings."""
        return self.adapters.first.settings

    @property
    def adapter_name(self) -> str:
        """The first adapter's name."""
        return self.adapters.first.name

    @property
    def lora_a(self) -> keras.Variable:
        """The first adapter's A."""
        return self.adapters.first.lora_a

    @property
    def lora_b(self) -> keras.Variable:
        """The first adapter's B."""
        return self.adapters.first.lora_b

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
        return self.lora_variables() + list(self.adapters.first.initial.variables)

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
        return dict(name=adapter.name, **dataclasses.asdict(adapter.settings))

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


def check_wrappable(layer) -> KernelSplit:
    """Raise `ValueError` unless `layer` is a built Dense/EinsumDense with
    no LoRA of its own; return its split."""
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
    return split_kernel(layer)  # Raises for an equation LoRA cannot factor.
