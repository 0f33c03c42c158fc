"""`merge_lora`: fold each LoRA update into its kernel, for free inference."""

from __future__ import annotations

import keras
from keras import ops

from keras_lora.injection import lora_layers
from keras_lora.surgery import replace_layers


def merge_lora(model: keras.layers.Layer) -> keras.layers.Layer:
    """Add `scale * A·B` into each wrapped kernel and unwrap the layers.

    The update is computed in float32 and rounded once into the kernel's
    dtype, so a float16 or bfloat16 kernel does not drift from adding a
    rounded update to a rounded kernel. Afterwards the model holds exactly
    the base model's layers and parameter count, and costs nothing extra at
    inference. The merged layers stay frozen like the rest of the base
    model (set `model.trainable = True` to train everything).

    Args:
        model: a model with `LoraLayer`s (from `inject_lora`).

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: if the model has no `LoraLayer`, or a wrapped layer is
            quantized (its integer kernel cannot absorb the update).

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = inject_lora(model, targets="dense")
    >>> model = merge_lora(model)
    >>> lora_layers(model)
    []
    """
    wrapped = lora_layers(model)
    if not wrapped:
        raise ValueError(
            f"Model '{model.name}' has no LoraLayer to merge. Call "
            "`inject_lora(model)` (or `load_adapter`) first."
        )
    for layer in wrapped:
        mode = getattr(layer.original_layer, "quantization_mode", None)
        if mode is not None:
            raise ValueError(
                f"Layer '{layer.name}' is quantized ({mode}); its kernel "
                "cannot absorb a LoRA update. Merge into the float model "
                "before quantizing it."
            )
    for layer in wrapped:
        kernel = layer.original_layer.kernel
        merged = ops.add(ops.cast(kernel.value, "float32"), layer.delta())
        kernel.assign(ops.cast(merged, kernel.dtype))
    replace_layers(model, {id(layer): layer.unwrap() for layer in wrapped})
    return model
