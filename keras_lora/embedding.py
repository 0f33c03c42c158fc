"""`LoraEmbedding`: a frozen embedding table plus a trainable low-rank table.

PEFT's `lora.Embedding`: the table `E` (vocabulary x dim) becomes
`E + scale * A·B` with A (vocabulary, rank) and B (rank, dim), so a lookup
adds `scale * take(A, ids) · B` (PEFT stores the transposes,
`lora_embedding_A` (rank, vocabulary) and `lora_embedding_B` (dim, rank)).
The vocabulary x dim update is never built in a call: only on `merge_lora`.

A tied output head (a `ReversibleEmbedding` with `tie_weights=True`, as
keras-hub's GPT-2 and Gemma: `call(h, reverse=True)` is `h · Eᵀ`) gets the
same update, as the tied weights would: `scale * (h · Bᵀ) · Aᵀ`, two small
matmuls. A `logit_soft_cap` (Gemma 2) is applied after the update is
added. An untied `ReversibleEmbedding` (Llama: a separate
`reverse_embeddings`) adapts the lookup only; its head is its own weight.

Whether a layer is reversible is read from the layer itself (a `reverse`
argument of its `call` and a `tie_weights` attribute): no keras-hub import.

PEFT itself adapts only the lookup of an embedding whose head is not
targeted too, tied or not; `adapt_head=False` computes that model (what
`import_peft` builds from such an adapter). Its merge is refused: the tied
head would move with the table.

A starts at zero and B standard normal, PEFT's choice for embeddings (for
`init="kaiming"` and `"gaussian"` alike): a fresh adapter is an exact
no-op. PEFT applies no dropout on an embedding's LoRA path; neither does
this layer (a `dropout` setting is kept, and ignored).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import keras
from keras import ops

from keras_lora.kernel_split import KernelSplit
from keras_lora.layer import LoraLayer
from keras_lora.quantized import quantization_mode
from keras_lora.settings import LoraSettings


def is_reversible(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is an embedding that also projects back to the
    vocabulary (`call(x, reverse=True)`), like `ReversibleEmbedding`."""
    if not hasattr(layer, "tie_weights"):
        return False
    try:
        return "reverse" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


def is_tied(layer: keras.layers.Layer) -> bool:
    """Whether `layer`'s output head is its own table (tied weights)."""
    return is_reversible(layer) and bool(layer.tie_weights)


def check_embedding(
    layer: keras.layers.Layer, settings: Mapping | LoraSettings | None = None
) -> None:
    """Raise `ValueError` unless `LoraEmbedding(layer, **settings)` can be built.

    Checked before any layer changes (by `inject_lora`, `load_adapter`,
    `import_peft`): the message names the fix.

    Args:
        layer: the embedding to wrap.
        settings: `LoraEmbedding` keyword arguments, or a `LoraSettings`.
    """
    _check_table_settings(layer, _check_table(layer), LoraSettings.of(settings or {}))


def _check_table(layer: keras.layers.Layer) -> KernelSplit:
    """Raise `ValueError` unless `layer` is an embedding LoRA can wrap;
    return its table's split."""
    name = getattr(layer, "name", layer)
    if isinstance(layer, LoraLayer):
        raise ValueError(
            f"Layer '{name}' is already wrapped by a LoRA layer. Call "
            "`merge_lora(model)` first, or leave it out of `targets`."
        )
    if not isinstance(layer, keras.layers.Embedding):
        raise ValueError(
            f"Layer '{name}' is a {type(layer).__name__}, not a "
            "keras.layers.Embedding; LoraEmbedding wraps embeddings only."
        )
    if not layer.built:
        raise ValueError(
            f"Embedding '{name}' is not built, so its table shape is unknown. "
            "Build the model first (call it on a batch), then add LoRA."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Embedding '{name}' has Keras's built-in LoRA enabled "
            "(`enable_lora`). Build it without `enable_lora` to wrap it "
            "with keras_lora."
        )
    mode = quantization_mode(layer)
    if mode is not None:
        raise ValueError(
            f"Embedding '{name}' is quantized ({mode}); keras_lora adapts "
            "float embedding tables only (a quantized table's lookup and tied "
            "head are not what LoRA's update is exact against). Add LoRA to "
            "the float model and quantize after `merge_lora`, or leave "
            f"'{name}' out of `targets`."
        )
    return table_split(layer)


def _check_table_settings(
    layer: keras.layers.Layer, split: KernelSplit, settings: LoraSettings
) -> None:
    """Raise `ValueError` for settings an embedding refuses."""
    name, init = layer.name, settings.init
    if settings.rewrites_kernel:
        raise ValueError(
            f"Embedding '{name}': init={init!r} (PiSSA/OLoRA) is not supported "
            "on embeddings. Use init='kaiming' or 'gaussian' (an embedding's "
            "factors start as PEFT's: A zeros, B normal), or leave "
            f"'{name}' out of `targets`."
        )
    if settings.use_dora:
        raise ValueError(
            f"Embedding '{name}': DoRA (use_dora=True) is not supported on "
            "embeddings. Leave the embedding out of `targets` for DoRA, or "
            "inject it in a separate `inject_lora` call without use_dora."
        )


def table_split(layer: keras.layers.Embedding) -> KernelSplit:
    """The table as a LoRA matrix from the (one-hot) vocabulary to features:
    A (vocabulary, rank), B (rank, dim), update `A·B` shaped like the table."""
    return KernelSplit(
        input_spec="...a",
        output_spec="...b",
        kernel_spec="ab",
        in_axes="a",
        out_axes="b",
        in_shape=(int(layer.input_dim),),
        out_shape=(int(layer.output_dim),),
    )


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraEmbedding(LoraLayer):
    """Wraps a built `keras.layers.Embedding` with a low-rank table update.

    The lookup of ids gets `scale * take(A, ids) · B` added (`scale =
    alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora`): the table is
    `E + scale * A·B`, as PEFT's `lora.Embedding`. For a tied
    `ReversibleEmbedding` (GPT-2's `token_embedding`), `call(h,
    reverse=True)` gets the same update through the head, `scale * (h ·
    Bᵀ) · Aᵀ`, before any `logit_soft_cap`; an untied one (Llama) adapts
    the lookup only. A starts at zero and B standard normal (PEFT's
    choice): a fresh adapter is an exact no-op. Both factors are float32,
    created here; the table is frozen. It is a `LoraLayer` for the rest of
    keras_lora (`lora_layers`, adapter files, `merge_lora`, named adapters,
    `set_adapter`, `disable_lora`, `adapter_batch`, `add_weighted_adapter`);
    DoRA, PiSSA/OLoRA and quantized tables are refused.

    Args:
        original_layer: a built `keras.layers.Embedding` (or a subclass such
            as `ReversibleEmbedding`).
        rank: rank of the update, a positive integer.
        alpha: scaling numerator; the update is scaled by `alpha / rank`.
        dropout: kept for configs; PEFT applies no dropout on embeddings,
            and neither does this layer.
        use_rslora: scale by `alpha / sqrt(rank)`.
        seed: seed for B's initialisation.
        adapter_name: the first adapter's name.
        init: `"kaiming"` or `"gaussian"` (the same start for embeddings);
            PiSSA/OLoRA are refused.
        use_dora: must be False (refused).
        adapt_head: for a tied head, whether the update also goes through
            it (default). False adapts the lookup only, as PEFT does with
            an adapter that does not target the tied head; `merge_lora`
            then refuses (the head would move with the table).
        **kwargs: base `Layer` arguments; `name` defaults to the wrapped
            layer's name.

    Example:

    >>> table = keras.layers.Embedding(10, 4)
    >>> table.build((None,))
    >>> lora = LoraEmbedding(table, rank=2, alpha=2.0)
    >>> tuple(lora.lora_a.shape), tuple(lora.lora_b.shape)
    ((10, 2), (2, 4))
    >>> ids = keras.ops.convert_to_tensor([[1, 2, 3]])
    >>> bool(ops.all(lora(ids) == table(ids)))  # A starts at zero.
    True
    """

    applies_dropout = False

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
        adapt_head: bool = True,
        **kwargs,
    ):
        super().__init__(
            original_layer,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            seed=seed,
            adapter_name=adapter_name,
            init=init,
            use_dora=use_dora,
            **kwargs,
        )
        self.adapt_head = bool(adapt_head)

    check_layer = staticmethod(_check_table)
    check_settings = staticmethod(_check_table_settings)

    def take_over(self, original_layer: keras.layers.Layer) -> None:
        """Read how the embedding is called: reversible, tied, masking.

        Args:
            original_layer: the embedding being wrapped.
        """
        self.reversible = is_reversible(original_layer)
        self.tied = is_tied(original_layer)
        self.supports_masking = original_layer.supports_masking

    def factor_initializers(self, settings: LoraSettings) -> tuple:
        """A's and B's initializers: zeros and standard normal (PEFT's
        `reset_lora_parameters` for `lora_embedding_A/B`), whatever `init`.

        Args:
            settings: the adapter's settings (`seed`).
        """
        return keras.initializers.Zeros(), keras.initializers.RandomNormal(
            stddev=1.0, seed=settings.seed
        )

    def call(self, inputs, reverse=False, training=None):
        self.check_float()
        if reverse:
            return self._reverse(inputs)
        outputs = self.original_layer(inputs)
        terms = self._terms()
        if not terms:
            return outputs
        ids = ops.cast(inputs, "int32")
        dtype = outputs.dtype
        for adapter, weight in terms:
            rows = ops.cast(ops.take(adapter.lora_a, ids, axis=0), dtype)
            rows = rows * self._factor(adapter, weight, len(rows.shape), dtype)
            update = ops.matmul(rows, ops.cast(adapter.lora_b, dtype))
            outputs = ops.add(outputs, update)
        return outputs

    def _reverse(self, inputs):
        layer = self.original_layer
        if not self.reversible:
            raise ValueError(
                f"Embedding '{self.name}' is a {type(layer).__name__}, which "
                "has no reverse (output head) call."
            )
        terms = self._terms() if self.tied and self.adapt_head else []
        if not terms:
            return layer(inputs, reverse=True)
        cap = getattr(layer, "logit_soft_cap", None)
        if cap is None:
            logits = layer(inputs, reverse=True)
        else:
            # The cap goes on after the update: the head's own logits
            # are computed here uncapped (ReversibleEmbedding's math).
            kernel = ops.transpose(layer.embeddings)
            x = inputs
            if layer.reverse_dtype is not None:
                x = ops.cast(x, layer.reverse_dtype)
                kernel = ops.cast(kernel, layer.reverse_dtype)
            logits = ops.matmul(x, ops.cast(kernel, x.dtype))
        dtype = logits.dtype
        x = ops.cast(inputs, dtype)
        for adapter, weight in terms:
            # (h · Bᵀ) · Aᵀ: tokens x rank in between, never vocab x dim.
            low = ops.matmul(x, ops.transpose(ops.cast(adapter.lora_b, dtype)))
            low = low * self._factor(adapter, weight, len(low.shape), dtype)
            logits = ops.add(
                logits, ops.matmul(low, ops.transpose(ops.cast(adapter.lora_a, dtype)))
            )
        if cap is not None:
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def _terms(self) -> list:
        """`(adapter, weight)` for each adapter whose update applies now:
        weight None (Python-active), a gate (scalar) or per-row weights."""
        state = self.adapters
        if state.fast_path:
            return [(state.first, None)]
        if state.gates is None:  # Never switched: the Python active set.
            return [] if state.disabled else [(state[n], None) for n in state.active]
        adapters = list(state.by_name.values())
        if state.batching:
            weights = ops.one_hot(state.rows, len(adapters) + 1, dtype="float32")
            return [(a, weights[:, i + 1]) for i, a in enumerate(adapters)]
        return [(a, state.gates[i]) for i, a in enumerate(adapters)]

    @staticmethod
    def _factor(adapter, weight, ndim: int, dtype):
        """`scale`, times the gate or each row's weight (batch axis first)."""
        if weight is None:
            return ops.cast(adapter.scale, dtype)
        if len(weight.shape) == 1:  # Per row: (batch,) -> (batch, 1, ...).
            weight = ops.reshape(weight, (-1,) + (1,) * (ndim - 1))
        return ops.cast(weight * adapter.scale, dtype)

    def check_float(self) -> None:
        mode = quantization_mode(self.original_layer)
        if mode is not None:
            raise ValueError(
                f"Embedding '{self.name}' was quantized ({mode}) after LoRA "
                "wrapped it; keras_lora adapts float tables only. Call "
                "`merge_lora(model)` before quantizing."
            )

    def compute_mask(self, inputs, mask=None):
        return self.original_layer.compute_mask(inputs, mask)

    def compute_output_shape(self, input_shape, reverse=False):
        if reverse:
            return tuple(input_shape[:-1]) + (self.split.fan_in,)
        return tuple(input_shape) + (self.split.fan_out,)

    def compute_output_spec(self, inputs, reverse=False, training=None):
        # As ReversibleEmbedding: Keras cannot route `reverse` to
        # `compute_output_shape` itself.
        shape = self.compute_output_shape(tuple(inputs.shape), reverse)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def check_mergeable(self) -> None:
        """Raise `ValueError` if the table cannot take the update exactly."""
        self.check_float()
        if self.tied and not self.adapt_head:
            raise ValueError(
                f"Embedding '{self.name}' adapts its lookup only "
                "(adapt_head=False, as PEFT computes an adapter that does not "
                "target the tied output head), but the head reads the same "
                "table: merging would move the head too and change the "
                "model. Keep it unmerged, or re-train with the head adapted "
                "(the default)."
            )

    def merged_table(self, adapter_names) -> object:
        """The table plus the named adapters' updates, float32."""
        table = ops.convert_to_tensor(self.original_layer.embeddings)
        table = ops.cast(table, "float32")
        for name in adapter_names:
            table = ops.add(table, self.delta(name))
        return table

    def get_config(self):
        config = keras.layers.Layer.get_config(self)
        original = keras.saving.serialize_keras_object(self.original_layer)
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
            adapt_head=self.adapt_head,
        )
        config.update(self._adapters_config())
        return config

    @staticmethod
    def _later_adapter_config(adapter) -> dict:
        settings = LoraLayer._later_adapter_config(adapter)
        del settings["use_dora"]  # Refused on embeddings.
        return settings

    def unwrap(self) -> keras.layers.Layer:
        """Return the wrapped embedding (frozen, as the rest of the base)."""
        return self.original_layer


def wrapper_class(layer: keras.layers.Layer) -> type[LoraLayer]:
    """`LoraEmbedding` for an embedding, `LoraLayer` for anything else."""
    if isinstance(layer, keras.layers.Embedding):
        return LoraEmbedding
    return LoraLayer


def wrapper_for(layer: keras.layers.Layer, **settings) -> LoraLayer:
    """`layer` wrapped by its `wrapper_class`, with `settings`."""
    return wrapper_class(layer)(layer, **settings)


def check_target(layer: keras.layers.Layer, options: Mapping) -> None:
    """Raise `ValueError` unless `wrapper_for(layer, **options)` can be
    built, with the message the constructor would give. Changes nothing.

    Args:
        layer: a layer to wrap.
        options: the wrapper's keyword arguments.
    """
    cls = wrapper_class(layer)
    cls.check_settings(layer, cls.check_layer(layer), LoraSettings.of(options))


def base_weight(layer: keras.layers.Layer):
    """The weight LoRA updates: a Dense/EinsumDense kernel or a table."""
    if isinstance(layer, keras.layers.Embedding):
        return layer.embeddings
    return layer.kernel
