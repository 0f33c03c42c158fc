"""`merge_lora`: fold each LoRA update into its kernel, for free inference."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from keras_lora.embedding import LoraEmbedding
from keras_lora.injection import lora_layers
from keras_lora.quantized import (
    REQUANTIZABLE_MODES,
    check_quantization_mode,
    dequantized_kernel,
    float_twin,
    quantization_mode,
    requantize,
)
from keras_lora.surgery import replace_layers
from keras_lora.switching import check_names


def merge_lora(
    model: keras.layers.Layer,
    quantized: str | None = None,
    adapter_names: str | Sequence[str] | None = None,
) -> keras.layers.Layer:
    """Add `scale * A·B` into each wrapped kernel and unwrap the layers.

    An embedding's table takes `scale * A·B` the same way (see
    `keras_lora.embedding`); a tied output head reads that table, so it
    follows.

    A DoRA adapter's kernel becomes `m / ||W + s·A·B|| * (W + s·A·B)` per
    output feature, exactly what its unmerged layer computes.

    The update is computed in float32 and rounded once into the kernel's
    dtype, so a float16 or bfloat16 kernel does not drift from adding a
    rounded update to a rounded kernel. Afterwards the model holds exactly
    the base model's layers and parameter count, and costs nothing extra at
    inference. The merged layers stay frozen like the rest of the base
    model (set `model.trainable = True` to train everything).

    A quantized kernel (`model.quantize(...)` before or after `inject_lora`)
    cannot absorb the update as it is; `quantized` says what to do:

    - `"requantize"`: dequantize the kernel, add the update in float32 and
      quantize again with Keras's own quantizer and the layer's config; the
      layer stays int8/int4 (a float8 layer keeps its float kernel, which
      takes the update exactly). The rounding adds error against the
      unmerged model (measured on a tiny GPT-2: see the README).
    - `"float"`: replace the layer by a float layer holding the dequantized
      kernel plus the update: exact, but the kernel takes float memory.

    Args:
        model: a model with `LoraLayer`s (from `inject_lora`).
        quantized: `"requantize"` or `"float"`; required when a wrapped
            layer is quantized, ignored otherwise.
        adapter_names: with several adapters, the one(s) whose updates are
            added (by default the active ones); the others are dropped,
            since every layer is unwrapped. A PiSSA/OLoRA adapter left out
            gives its layer's original kernel back.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: if the model has no `LoraLayer`, a wrapped layer is
            quantized and `quantized` is not one of the two choices, or a
            wrapped layer is quantized in a mode LoRA does not support
            (GPTQ, AWQ), or `adapter_names` names an adapter the model
            does not hold. The model is unchanged then.

    Example:

    >>> from keras_lora import inject_lora, lora_layers
    >>> dense = keras.layers.Dense(4, name="dense")
    >>> model = keras.Sequential([keras.Input((8,)), dense])
    >>> model = inject_lora(model, targets="dense")
    >>> model = merge_lora(model)
    >>> lora_layers(model)
    []

    Over a quantized base, choose what the merge does:

    >>> dense = keras.layers.Dense(4, name="dense")
    >>> model = keras.Sequential([keras.Input((8,)), dense])
    >>> dense.quantize("int8")  # Model.quantize prints a report in Keras 3.16
    >>> model = inject_lora(model, targets="dense")
    >>> model = merge_lora(model, quantized="requantize")
    >>> model.layers[0].quantization_mode
    'int8'
    """
    wrapped = lora_layers(model)
    if not wrapped:
        raise ValueError(
            f"Model '{model.name}' has no LoraLayer to merge. Call "
            "`inject_lora(model)` (or `load_adapter`) first."
        )
    if adapter_names is None:
        chosen = {id(layer): layer.adapters.active for layer in wrapped}
    else:
        names = check_names(model, wrapped, adapter_names)
        chosen = {
            id(layer): tuple(n for n in names if n in layer.adapters)
            for layer in wrapped
        }
    quantized_layers = []
    for layer in wrapped:
        if isinstance(layer, LoraEmbedding):
            layer.check_mergeable()  # Quantized later, or lookup-only tied.
        check_quantization_mode(layer.original_layer)
        mode = quantization_mode(layer.original_layer)
        if mode is not None:
            quantized_layers.append(f"'{layer.name}' ({mode})")
    if quantized_layers and quantized not in QUANTIZED_CHOICES:
        raise ValueError(
            f"Layers {', '.join(quantized_layers[:4])} are quantized; their "
            "kernels cannot absorb the LoRA update as they are. Choose "
            "`merge_lora(model, quantized='requantize')` (add the update to "
            "the dequantized kernel and quantize again: stays small, adds "
            "rounding error) or `quantized='float'` (float layers with the "
            f"update added: exact). Received: quantized={quantized!r}"
        )
    # Compute every merged kernel (and float layer) before changing any.
    plans = []
    for layer in wrapped:
        original = layer.original_layer
        if isinstance(layer, LoraEmbedding):
            # The table takes the update; a tied head reads the same table.
            plans.append((layer, None, layer.merged_table(chosen[id(layer)])))
            continue
        mode = quantization_mode(original)
        base = merged = dequantized_kernel(original)
        for name in chosen[id(layer)]:
            merged = ops.add(merged, layer.adapters[name].kernel_update(layer, base))
        first = layer.adapters.first
        if first.name not in chosen[id(layer)]:
            # A PiSSA/OLoRA adapter left out: its residual kernel takes the
            # initial update back, which gives the original kernel.
            merged = first.initial.restore(layer, merged)
        plans.append((layer, mode, merged))
    replacements = {}
    for layer, mode, merged in plans:
        original = layer.unwrap()
        if mode is not None and quantized == "float":
            replacements[id(layer)] = float_twin(original, merged)
            continue
        if isinstance(layer, LoraEmbedding):
            table = original.embeddings
            table.assign(ops.cast(merged, table.dtype))
        elif mode in REQUANTIZABLE_MODES:
            requantize(original, merged)
        else:
            kernel = original.kernel
            kernel.assign(ops.cast(merged, kernel.dtype))
        replacements[id(layer)] = original
    replace_layers(model, replacements)
    return model


# The values `merge_lora(..., quantized=...)` accepts.
QUANTIZED_CHOICES = ("requantize", "float")
