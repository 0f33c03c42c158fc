"""LoRA over Keras-quantized frozen kernels (`int8`, `int4`, `float8`).

A `LoraLayer` never touches a quantized kernel: the wrapped layer runs its
own quantized call and LoRA adds a float path beside it, so the kernel
stays int8/int4/float8 and is never dequantized into a persistent float
copy. This module holds what that needs (the private Keras attributes it
reads are behind `keras_lora._keras_internals`):

- which modes LoRA accepts, and the float policy a wrapper runs under;
- the straight-through input gradient Keras's int8 `ReversibleEmbedding`
  output head lacks (without it, LoRA over an int8 GPT-2 trains in the
  wrong direction; see `install_straight_through_gradients`);
- dequantizing a kernel and re-quantizing a merged one, for `merge_lora`;
- the float-equivalent weight list an adapter fingerprints, so an adapter
  trained over a quantized base loads into the float base and back.
"""

from __future__ import annotations

import contextlib

import keras
from keras import ops

from keras_lora import _keras_internals

# Modes whose quantized call computes `x @ dequantized(kernel)` with a
# correct input gradient, so a float LoRA path beside it trains as over the
# float kernel. GPTQ and AWQ are calibrated post-training formats whose
# kernels Keras cannot re-quantize after a merge; keras_lora refuses them.
SUPPORTED_MODES = ("int8", "int4", "float8")
# Modes `merge_lora(..., quantized="requantize")` can write back.
REQUANTIZABLE_MODES = ("int8", "int4")
# The weights of a quantized layer (by `quantization_variables` key) that
# the float layer has too; the others are quantization state.
_FLOAT_WEIGHTS = ("kernel", "embeddings", "reverse_embeddings", "bias")


def quantization_mode(layer: keras.layers.Layer) -> str | None:
    """The layer's Keras quantization mode (`"int8"`, ...), `None` if float."""
    return getattr(layer, "quantization_mode", None)


def check_quantization_mode(layer: keras.layers.Layer) -> None:
    """Raise `ValueError` if `layer` is quantized in a mode LoRA cannot wrap."""
    mode = quantization_mode(layer)
    if mode is not None and mode not in SUPPORTED_MODES:
        raise ValueError(
            f"Layer '{layer.name}' is quantized with mode '{mode}'; keras_lora "
            f"supports LoRA over {', '.join(SUPPORTED_MODES)} kernels only "
            "(GPTQ and AWQ are calibrated formats Keras cannot re-quantize "
            "after a merge). Quantize with `model.quantize('int8')` or "
            "`'int4'`, or leave this layer out of `targets`."
        )


def float_policy(policy: keras.DTypePolicy) -> keras.DTypePolicy:
    """The policy a quantized policy was made from ("int8_from_float32" ->
    "float32"); a float policy unchanged.

    A `LoraLayer` runs under it: under the quantized policy Keras would
    dispatch the wrapper to a quantized call it does not have.

    A `DTypePolicyMap` (a model built quantized layer by layer, see
    `quantized_dtype_policy`) gives its default policy, the float policy
    its layers were quantized from.

    >>> float_policy(keras.dtype_policies.get("int8_from_mixed_bfloat16")).name
    'mixed_bfloat16'
    """
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return float_policy(policy.default_policy)
    if getattr(policy, "quantization_mode", None) is None:
        return policy
    # Keras names quantized policies "{mode}_from_{source policy}".
    return keras.dtype_policies.get(policy.name.split("_from_", 1)[1])


def kernel_path(layer: keras.layers.Layer) -> str:
    """Path of the layer's stored kernel variable ("block/query/kernel"), or
    of an embedding's table ("token_embedding/embeddings").

    A quantized layer's `kernel` property may be a computed tensor (int4
    unpacks it), so the path comes from the stored variable named "kernel".
    """
    name = "embeddings" if isinstance(layer, keras.layers.Embedding) else "kernel"
    for variable in layer.weights:
        if variable.name == name:
            return variable.path
    return layer.kernel.path


def dequantized_kernel(layer: keras.layers.Layer):
    """The layer's kernel as float32, shaped like the float kernel.

    For a float layer this is its kernel; for an int8/int4 layer it is
    what the quantized call multiplies by (computed now, not stored).

    Raises:
        ValueError: for a mode that cannot be dequantized here.
    """
    mode = quantization_mode(layer)
    if mode is None or mode == "float8":
        # float8 keeps the float kernel and quantizes it on each call.
        return ops.cast(ops.convert_to_tensor(layer.kernel), "float32")
    if mode not in REQUANTIZABLE_MODES:
        check_quantization_mode(layer)
    return _keras_internals.dequantize_kernel(layer)


def float_twin(layer: keras.layers.Layer, kernel=None) -> keras.layers.Layer:
    """A new float layer configured like `layer`, holding `kernel` and its
    bias; without `kernel`, the weights its initializers draw.

    Its variables get the same paths as the original's (it is built in the
    original's name scope), so layout maps and adapter keys still match.
    """
    config = layer.get_config()
    config["dtype"] = float_policy(layer.dtype_policy)
    config.pop("quantization_config", None)
    twin = type(layer).from_config(config)
    # Variable paths are the name scopes at creation plus the layer's name.
    with contextlib.ExitStack() as scopes:
        for name in kernel_path(layer).split("/")[:-2]:
            scopes.enter_context(keras.name_scope(name))
        twin.build_from_config(layer.get_build_config())
    if kernel is not None:
        twin.kernel.assign(ops.cast(kernel, twin.kernel.dtype))
        if getattr(layer, "bias", None) is not None:
            twin.bias.assign(layer.bias.value)
    twin.trainable = layer.trainable
    return twin


def requantize(layer: keras.layers.Layer, kernel) -> None:
    """Re-quantize the float `kernel` into `layer`'s int8/int4 variables.

    Keras's own `quantize` does the rounding (on a float twin, with the
    layer's quantization config), so the scales and packing match what
    `model.quantize` would have produced for that kernel.
    """
    twin = float_twin(layer, kernel)
    twin.quantize(quantization_mode(layer), config=layer.quantization_config)
    values = _keras_internals.quantization_variables(twin)
    for name, variable in _keras_internals.quantization_variables(layer).items():
        if name != "bias":
            variable.assign(values[name].value)


def base_weight_entries(model: keras.layers.Layer, skip_ids: set) -> list[str]:
    """Sorted `"path:shape"` of each weight of `model` not in `skip_ids`, as
    the float model would have them.

    A quantized kernel is listed at its float shape and the quantization
    variables beside it are left out, so a model fingerprints the same
    whether its kernels are float, int8, int4 or float8.
    """
    # id(variable) -> (its layer, the attribute holding it)
    quantized = {}
    for layer in _keras_internals.flatten_layers(model):
        for name, v in _keras_internals.quantization_variables(layer).items():
            quantized[id(v)] = (layer, name)
    entries = []
    for v in model.weights:
        if id(v) in skip_ids:
            continue
        shape, (layer, name) = tuple(v.shape), quantized.get(id(v), (None, None))
        if layer is not None:
            if name not in _FLOAT_WEIGHTS:
                continue
            if name == "kernel":
                shape = tuple(int(d) for d in layer.kernel.shape)
            elif name == "embeddings":
                shape = (layer.input_dim, layer.output_dim)
            elif name == "reverse_embeddings":
                shape = (layer.output_dim, layer.input_dim)
        entries.append(f"{v.path}:{shape}")
    return sorted(entries)


def install_straight_through_gradients(model: keras.layers.Layer) -> int:
    """Give int8 `ReversibleEmbedding` output heads a correct input gradient.

    Keras's int8 `ReversibleEmbedding(reverse=True)` (GPT-2's tied output
    head) quantizes its inputs with a rounding that has no gradient and,
    unlike int8 `Dense`/`EinsumDense`, defines no custom gradient: the
    hidden states get only the gradient through the per-token scale, which
    points the wrong way. Every LoRA factor sits before the head, so LoRA
    over `model.quantize("int8")` trained in the wrong direction. This
    gives each such layer the straight-through gradient Keras's int8
    `Dense` uses (`upstream @ dequantized(kernel).T`), computed in the
    backward pass only. It is set on the instances, is dormant until the
    layer is quantized, and so covers both orders (quantize then inject,
    inject then quantize).

    Returns:
        The number of layers given the gradient.
    """
    count = 0
    for layer in _keras_internals.flatten_layers(model):
        if isinstance(layer, keras.layers.ReversibleEmbedding) and not getattr(
            layer, "_keras_lora_straight_through", False
        ):
            _set_straight_through(layer)
            count += 1
    return count


def _set_straight_through(layer) -> None:
    def with_straight_through(keras_call):
        def quantized_call(inputs, reverse=False):
            if not reverse or quantization_mode(layer) != "int8":
                return keras_call(inputs, reverse=reverse)
            # The head multiplies by the table's transpose: one row per
            # vocabulary entry, one scale per row.
            if layer.tie_weights:
                table = _keras_internals.stored_weight(layer)
                scale = layer.embeddings_scale
            else:
                table = ops.transpose(layer.reverse_embeddings)
                scale = layer.reverse_embeddings_scale
            logits = _reverse_int8(
                layer,
                inputs,
                ops.convert_to_tensor(table),
                ops.convert_to_tensor(scale),
            )
            if layer.logit_soft_cap is not None:
                cap = layer.logit_soft_cap
                logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
            return logits

        return quantized_call

    _keras_internals.intercept_quantized_call(layer, with_straight_through)
    object.__setattr__(layer, "_keras_lora_straight_through", True)


def _reverse_int8(layer, inputs, table, scale):
    # `table` as stored (one row per vocabulary entry): the backward pass
    # reads it a block of rows at a time.
    @ops.custom_gradient
    def logits_with_inputs_gradient(inputs, table, scale):
        def grad_fn(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            gradient = _inputs_gradient(upstream, table, scale, layer.compute_dtype)
            return gradient, None, None

        # The forward pass is Keras's own int8 reverse call.
        if layer.inputs_quantizer:
            inputs, inputs_scale = layer.inputs_quantizer(inputs)
        else:
            inputs_scale = ops.ones((1,), dtype=layer.compute_dtype)
        logits = ops.matmul(inputs, ops.transpose(table))
        logits = ops.cast(logits, layer.compute_dtype)
        return ops.divide(logits, ops.multiply(inputs_scale, scale)), grad_fn

    return logits_with_inputs_gradient(inputs, table, scale)


# Vocabulary entries per block of the int8 head's input gradient: 12 MB of
# dequantized kernel at GPT-2's width instead of the whole 0.15 GB.
_VOCAB_BLOCK = 4096


def _inputs_gradient(upstream, table, scale, dtype):
    """`upstream @ dequantized(table)` for an int8 head table of shape
    (vocabulary, features) with a scale per row, one block of rows at a
    time: the float table never exists whole (whole, it was the largest
    buffer of a LoRA step over an int8 GPT-2 with the chunked loss, 0.15
    GB). The blocks add up in float32 whatever `dtype` computes them.
    """
    vocab, features = table.shape
    batch_shape = ops.shape(upstream)[:-1]
    upstream = ops.reshape(upstream, (-1, vocab))
    tokens = ops.shape(upstream)[0]

    def part(start, size):
        rows = ops.cast(ops.slice(table, (start, 0), (size, features)), dtype)
        scaled = ops.divide(
            ops.slice(upstream, (0, start), (tokens, size)),
            ops.slice(scale, (start,), (size,)),
        )
        return ops.cast(ops.matmul(scaled, rows), "float32")

    block = min(vocab, _VOCAB_BLOCK)
    full = vocab // block
    gradient = ops.fori_loop(
        0,
        full,
        lambda i, total: total + part(i * block, block),
        ops.zeros((tokens, features), "float32"),
    )
    if vocab % block:
        gradient = gradient + part(full * block, vocab % block)
    return ops.cast(ops.reshape(gradient, (*batch_shape, features)), dtype)


def check_buildable_mode(mode: str) -> None:
    """Raise unless a model can be built quantized with `mode` (int8, int4).

    >>> check_buildable_mode("float8")
    Traceback (most recent call last):
    ...
    ValueError: Cannot build a model quantized with mode 'float8': choose int8 ...
    """
    if mode not in REQUANTIZABLE_MODES:
        raise ValueError(
            f"Cannot build a model quantized with mode '{mode}': choose "
            f"{' or '.join(REQUANTIZABLE_MODES)} (float8 keeps float kernels, "
            "so building it quantized saves nothing)."
        )


def quantized_dtype_policy(
    mode: str, paths, source: str = "float32"
) -> keras.dtype_policies.DTypePolicyMap:
    """A dtype policy that builds the layers at `paths` quantized.

    Give it as `dtype` to a model's constructor (e.g. a keras-hub backbone):
    each layer whose path fully matches one of `paths` (regular expressions)
    is built directly with `mode` kernels, every other layer under `source`.
    No float copy of the model ever exists, unlike `model.quantize` on a
    built model. The quantized kernels start as Keras builds them (zeros);
    `initialize_quantized` fills them from their initializers.
    `keras_lora.families.quantized_dtype(family, mode)` gives the paths of a
    keras-hub family.

    Args:
        mode: "int8" or "int4".
        paths: regular expressions of layer paths (`layer.path`) to
            quantize; only Dense, EinsumDense and Embedding layers can be.
        source: the float policy of the model and the LoRA path.

    Returns:
        A `keras.dtype_policies.DTypePolicyMap`.

    Raises:
        ValueError: for another mode, or no paths.

    >>> policy = quantized_dtype_policy("int8", ["dense_.*"])
    >>> layer = keras.layers.Dense(3, dtype=policy, name="dense_1")
    >>> layer.build((None, 2))
    >>> layer.quantization_mode, keras.backend.standardize_dtype(layer.kernel.dtype)
    ('int8', 'int8')
    """
    check_buildable_mode(mode)
    paths = list(paths)
    if not paths:
        raise ValueError("quantized_dtype_policy needs at least one layer path.")
    if mode == "int4":
        # `model.quantize("int4")`'s default: per-block scales (the block
        # size of a default `Int4QuantizationConfig`), which the policy
        # name carries so the layer builds the same variables.
        block = keras.quantizers.Int4QuantizationConfig().block_size
        mode = f"int4/{-1 if block is None else block}"
    quantized = keras.dtype_policies.get(f"{mode}_from_{source}")
    return keras.dtype_policies.DTypePolicyMap(
        default_policy=source, policy_map={path: quantized for path in paths}
    )


def initialize_quantized(model: keras.layers.Layer) -> int:
    """Fill each int8/int4 layer of a model built quantized from its own
    initializers, one layer at a time.

    Each layer gets what `model.quantize` would give a freshly initialised
    float model: a float twin of the layer (same config) draws its weights
    from the layer's initializers, Keras's `quantize` rounds them, and the
    quantized values are copied in; the twin is then dropped, so at most one
    layer's float weights exist at once. The layer also gets the
    quantization config and input quantizer `quantize` sets, so it computes
    exactly as a model quantized after a float build (load other weights
    into it afterwards if you have them).

    Args:
        model: a built model or layer.

    Returns:
        The number of layers filled.

    Raises:
        ValueError: if a layer is quantized in a mode other than int8/int4.
    """
    layers = [
        layer
        for layer in _keras_internals.flatten_layers(model)
        if quantization_mode(layer) is not None
        and not _keras_internals.sublayers(layer)
    ]
    for layer in layers:
        if quantization_mode(layer) not in REQUANTIZABLE_MODES:
            check_quantization_mode(layer)
            raise ValueError(
                f"Layer '{layer.name}' is quantized with mode "
                f"'{quantization_mode(layer)}'; initialize_quantized fills "
                f"{' and '.join(REQUANTIZABLE_MODES)} layers only."
            )
    for layer in layers:
        _fill_from_float_twin(layer)
    return len(layers)


def fill_quantized(layer: keras.layers.Layer, kernel) -> None:
    """Fill an int8/int4 Dense or EinsumDense layer built quantized from its
    float `kernel`: what `model.quantize` gives a float layer holding it.

    A float twin of the layer holds `kernel` (and the layer's bias), Keras's
    `quantize` rounds it, and the quantized values are copied in; at most
    this one layer's float weights exist at once.

    Args:
        layer: a built int8/int4 Dense or EinsumDense layer.
        kernel: the float kernel, in the float layer's kernel shape.
    """
    _fill_from_float_twin(layer, kernel)


def _fill_from_float_twin(layer, kernel=None) -> None:
    """Copy into quantized `layer` what `quantize` makes of a float twin
    holding `kernel` and `layer`'s bias, or its initializers' draws."""
    twin = float_twin(layer, kernel)
    twin.quantize(quantization_mode(layer), config=_build_config(layer))
    values = {v.name: v for v in twin.weights}
    for variable in layer.weights:
        variable.assign(values[variable.name].value)
    # `quantize` also sets how the call treats its inputs: an int4
    # ReversibleEmbedding built under the policy alone would quantize
    # its inputs in the reverse call, one quantized by `quantize` not.
    for name in ("quantization_config", "inputs_quantizer"):
        if hasattr(twin, name):
            setattr(layer, name, getattr(twin, name))


def _build_config(layer):
    """The quantization config that gives the variables `layer` was built
    with: its own, else for int4 the block size its policy names."""
    if layer.quantization_config is not None or quantization_mode(layer) != "int4":
        return layer.quantization_config
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path]
    block = getattr(policy, "block_size", None)
    return keras.quantizers.Int4QuantizationConfig(
        block_size=-1 if block is None else block
    )
