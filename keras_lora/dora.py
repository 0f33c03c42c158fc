"""DoRA: a trainable magnitude per output feature beside the LoRA factors.

DoRA (weight-decomposed LoRA, Liu et al. 2024) rescales each output feature
of the updated kernel `W + s·A·B` to a learned length `m`:

    f = m / ||W + s·A·B||     per output feature (norm over every input
                               feature the kernel contracts), float32
    y = f ⊙ (x·(W + s·A·B)) + bias

computed as PEFT's `DoraLinearLayer` does (peft/tuners/lora/dora.py): the
norm is a constant in the backward pass (`stop_gradient`), and the layer
adds `(f - 1)·(x'·W) + f·s·B(A(x'))` to the wrapped layer's output, where
`x'` is the dropped-out input while training with dropout (PEFT then
recomputes `x'·W`) and `x` otherwise (`x·W` is the output less its bias).
`m` starts at `||W||` (B is zero), so a fresh adapter changes nothing.

The magnitude is shaped like the layer's output features
(`KernelSplit.out_shape`) and named after the kernel
(".../query/lora_magnitude"). An adapter record holds a `Dora` piece as
its `variant` (`keras_lora.adapter_record`); the layer's call, the
mixed-batch check and `merge_lora` call the piece, never test for DoRA.

>>> from keras_lora import inject_lora
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="d")])
>>> _ = inject_lora(model, rank=2, targets="d", use_dora=True)
>>> [w.name for w in model.trainable_weights]
['lora_a', 'lora_b', 'lora_magnitude']
"""

from __future__ import annotations

import keras
from keras import ops

# Keras's own scope (public Layer(autocast=False) enters the same one): the
# norm reads the float32 kernel and magnitude as float32 under a mixed
# policy, where they would otherwise be cast to float16/bfloat16.
from keras_lora._keras_internals import autocast_scope
from keras_lora.initialization import rewrites_kernel
from keras_lora.kernel_split import KernelSplit
from keras_lora.low_rank import delta
from keras_lora.quantized import quantization_mode

MAGNITUDE = "lora_magnitude"


def check_base(layer: keras.layers.Layer, split: KernelSplit, init: str) -> None:
    """Raise `ValueError` unless DoRA can wrap `layer` (split as `split`).

    DoRA needs the float kernel on every call (its column norms), which a
    quantized layer does not hold; and its output features must be the
    output's trailing axes, possibly interleaved with axes of size one
    (every keras-hub projection's are). PiSSA/OLoRA rewrite the kernel
    that the magnitude is measured on: that pairing is not built.
    """
    if rewrites_kernel(init):
        raise ValueError(
            f"Layer '{layer.name}': DoRA with init={init!r} is not supported "
            "(PiSSA/OLoRA turn the kernel into a residual, which DoRA's "
            "magnitude would be measured against). Use init='kaiming' or "
            "'gaussian' with use_dora=True."
        )
    mode = quantization_mode(layer)
    if mode is not None:
        raise ValueError(
            f"Layer '{layer.name}' is quantized ({mode}); DoRA rescales each "
            "output feature by the norm of the float kernel on every call, "
            "which a quantized kernel does not hold. Use LoRA without DoRA "
            "(`use_dora=False`) over a quantized base, or `merge_lora` a "
            "DoRA adapter before quantizing."
        )
    _output_plan(split, layer.name)


def add_magnitude(layer, name: str, lora_a, lora_b, scale: float) -> keras.Variable:
    """Create `layer`'s float32 magnitude `name`, set to `||W + s·A·B||`.

    `layer` is a `LoraLayer` whose `original_layer` and `split` are set;
    `lora_a`, `lora_b` and `scale` are the adapter's.
    """
    magnitude = layer.add_weight(
        name=name, shape=layer.split.out_shape, initializer="zeros", dtype="float32"
    )
    magnitude.assign(weight_norm(layer, lora_a, lora_b, scale))
    return magnitude


def weight_norm(layer, lora_a, lora_b, scale: float, kernel=None):
    """`||W + s·A·B||` per output feature, float32, shaped `split.out_shape`.

    A constant for the gradient (DoRA section 4.3, and PEFT's `detach`).
    `kernel` defaults to the wrapped layer's kernel.
    """
    split: KernelSplit = layer.split
    if kernel is None:
        kernel = layer.original_layer.kernel
    kernel, a, b = _float32(kernel), _float32(lora_a), _float32(lora_b)
    rank = a.shape[-1]
    order = tuple(split.kernel_spec.index(c) for c in split.in_axes + split.out_axes)
    kernel = ops.reshape(ops.transpose(kernel, order), (split.fan_in, split.fan_out))
    a = ops.reshape(a, (split.fan_in, rank))
    b = ops.reshape(b, (rank, split.fan_out))
    weight = kernel + scale * ops.matmul(a, b)
    norm = ops.sqrt(ops.sum(ops.square(weight), axis=0))
    return ops.stop_gradient(ops.reshape(norm, split.out_shape))


def factor(layer, adapter):
    """`m / ||W + s·A·B||`, float32, shaped `split.out_shape`."""
    norm = weight_norm(layer, adapter.lora_a, adapter.lora_b, adapter.scale)
    return _float32(adapter.magnitude) / norm


def update(layer, adapter, inputs, outputs, training=None):
    """What a DoRA adapter adds to the wrapped layer's `outputs`.

    `outputs` is the wrapped layer's own output (bias included, before the
    activation), as PEFT's `result`.
    """
    original = layer.original_layer
    # The base may be quantized later.
    check_base(original, layer.split, adapter.init)
    perm, shape = _output_plan(layer.split, layer.name)
    f = factor(layer, adapter)
    if perm:
        f = ops.transpose(f, perm)
    f = ops.cast(ops.reshape(f, shape), layer.compute_dtype)
    bias = getattr(original, "bias", None)
    x = inputs
    if adapter.dropout_layer is not None and training:
        # PEFT: the base product is recomputed on the dropped-out input.
        x = adapter.dropout_layer(inputs, training=training)
        outputs = original(x, training=training)
    base = outputs if bias is None else ops.subtract(outputs, bias)
    # `x` is dropped out already: no second dropout on the LoRA path.
    lora = layer.lora_update(x, training=False, adapter=adapter)
    return ops.add(ops.multiply(f - 1, base), ops.multiply(f, lora))


def kernel_update(layer, adapter, kernel):
    """What a DoRA adapter adds to the float32 `kernel` when merged.

    `(f - 1)·W + f·s·A·B` per output feature (with `f` from `kernel`), so
    that `W` plus it is DoRA's `f·(W + s·A·B)`: with other adapters merged
    beside it, each adds its own term to the base, as in the forward pass.
    """
    split: KernelSplit = layer.split
    norm = weight_norm(layer, adapter.lora_a, adapter.lora_b, adapter.scale, kernel)
    f = _float32(adapter.magnitude) / norm
    size = dict(zip(split.out_axes, split.out_shape, strict=True))
    f = ops.reshape(f, tuple(size.get(c, 1) for c in split.kernel_spec))
    return (f - 1) * kernel + f * delta(split, adapter)


class Dora:
    """The DoRA variant of an adapter record: its magnitude, and the math
    above as the calls the record makes.

    Args:
        magnitude: the trainable float32 magnitude (`add_magnitude`).
    """

    # DoRA rescales the whole output per adapter: its path runs alone.
    fusable = False

    def __init__(self, magnitude: keras.Variable):
        self.magnitude = magnitude

    @property
    def variables(self) -> tuple:
        return (self.magnitude,)

    def update(self, layer, adapter, inputs, base, training=None):
        """What `adapter` adds to `base`, the wrapped layer's output."""
        return update(layer, adapter, inputs, base, training)

    def kernel_update(self, layer, adapter, kernel):
        """What `adapter` adds to the float32 `kernel` when merged."""
        return kernel_update(layer, adapter, kernel)


def _float32(value):
    """A variable's value (or a tensor) as a float32 tensor, never autocast.

    The value is read here, inside the scope: a variable handed on to an op
    would be read there, under the layer's autocast to float16/bfloat16.
    """
    with autocast_scope(None):
        if isinstance(value, keras.Variable):
            value = value.value
        return ops.cast(ops.convert_to_tensor(value), "float32")


def _output_plan(split: KernelSplit, name: str) -> tuple[tuple[int, ...], tuple]:
    """How the factor (in kernel order) broadcasts against the output.

    Returns `(perm, shape)`: transpose by `perm` (empty: already in order),
    reshape to `shape`, a trailing shape of the output.
    """
    spec = split.output_spec
    first = min(spec.index(c) for c in split.out_axes)
    tail = spec[first:]
    if "." in tail:
        raise ValueError(
            f"Layer '{name}' has output subscripts '{spec}' with an ellipsis "
            "after its output features; DoRA needs the output features to be "
            "the output's trailing axes. Use LoRA without DoRA (`use_dora=False`) "
            "for this layer."
        )
    order = [c for c in tail if c in split.out_axes]
    perm = tuple(split.out_axes.index(c) for c in order)
    size = dict(zip(split.out_axes, split.out_shape, strict=True))
    shape = tuple(size.get(c, 1) for c in tail)
    return (() if perm == tuple(range(len(perm))) else perm), shape
