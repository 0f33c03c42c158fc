"""The private Keras attributes keras_lora reads or shadows on quantized
Dense, EinsumDense and Embedding layers: their stored codes, the variables
a quantization mode adds, the kernel a quantized call multiplies by, and
the call itself. Part of the door, `keras_lora._keras_internals`, which
re-exports every function here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import keras
import numpy as np
from keras import ops


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


@contextlib.contextmanager
def loading_float_kernels(fill: Callable[..., None]) -> Iterator[None]:
    """Inside, a quantized Dense or EinsumDense layer that `load_weights`
    gives a float layer's saved variables calls `fill(layer, kernel, bias)`
    (numpy arrays; bias None without one) instead of loading them.

    Keras's `load_weights` walks the model and calls each layer's
    `load_own_variables(store)` with the entries it saved: a float layer's
    are "0" the kernel and "1" the bias (its `variable_serialization_spec`
    for no quantization), and a quantized layer's own `load_own_variables`
    would read them as its codes and scales. The two classes' method is
    replaced for the duration (Keras 3.15; 3.16.dev has the same method and
    entries, not run here); a store whose kernel is not float (a preset
    saved quantized) is loaded as Keras does.

    Args:
        fill: `(layer, kernel, bias) -> None`, called once per such layer.
    """
    originals = {
        cls: cls.load_own_variables
        for cls in (keras.layers.Dense, keras.layers.EinsumDense)
    }

    def routed(original: Callable) -> Callable:
        def load_own_variables(self, store):
            mode = getattr(self, "quantization_mode", None)
            if mode is None or "0" not in store:
                return original(self, store)
            kernel = np.asarray(store["0"])
            if kernel.dtype.kind != "f":
                return original(self, store)
            bias = (
                np.asarray(store["1"])
                if getattr(self, "bias", None) is not None
                else None
            )
            fill(self, kernel, bias)

        return load_own_variables

    for cls, original in originals.items():
        cls.load_own_variables = routed(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.load_own_variables = original
