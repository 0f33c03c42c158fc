"""The keras-hub internals keras_lora relies on: where its decoder layers
build their attention masks, and how its Hugging Face converters port each
checkpoint tensor into a backbone. Part of the door,
`keras_lora._keras_internals`; it imports keras_hub, so it is imported by
modules above the core only (interop, recipes).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence

import keras
from keras import ops


@contextlib.contextmanager
def narrowed_attention_masks(
    layers: Sequence[keras.layers.Layer], method: str, mask
) -> Iterator[None]:
    """Inside, each of `layers` attends only where its own attention mask
    and `mask` both allow.

    keras-hub's decoder layers build their (batch, query, key) attention
    mask (causal, padding, Mistral's sliding window) in a private method,
    and Gemma's and Gemma 3's take no mask argument at all:
    `LlamaTransformerDecoder`, `MistralTransformerDecoder` and
    `QwenTransformerDecoder._compute_self_attention_mask`,
    `GemmaDecoderBlock` and `Gemma3DecoderBlock._compute_attention_mask`
    (keras-hub 0.32.0 with Keras 3.15, and 0.33.dev with 3.16.dev). Each
    layer's method is shadowed on the instance, past Keras's and torch's
    `__setattr__`, by one returning the AND of its result and `mask` (in
    the result's dtype), and restored on exit. Gemma 2's and Gemma 3's
    sliding windows are applied later, inside the attention layer, so they
    still apply.

    Args:
        layers: keras-hub transformer decoder layers.
        method: the name of the layers' attention mask method.
        mask: a boolean tensor broadcastable to (batch, query, key).
    """

    def narrowed(computed: Callable) -> Callable:
        def call(*args, **kwargs):
            own = computed(*args, **kwargs)
            both = ops.logical_and(ops.cast(own, "bool"), mask)
            return ops.cast(both, own.dtype)

        return call

    for layer in layers:
        object.__setattr__(layer, method, narrowed(getattr(layer, method)))
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, method)


def convert_hf_weights(
    backbone: keras.Model,
    model_dir: str,
    port: Callable[[str, list[int], Callable[[], object]], bool],
) -> None:
    """Fill `backbone` from the Hugging Face checkpoint in `model_dir` with
    keras-hub's own converter for its model type, offering each tensor to
    `port` first.

    keras-hub's `TransformersPresetLoader(preset, config).converter` is the
    family's converter module; its `convert_weights(backbone, loader,
    config)` calls `loader.port_weight(keras_variable, hf_weight_key,
    hook_fn)` once per tensor, and `SafetensorLoader.port_weight` reads the
    tensor, applies `hook_fn(tensor, list(keras_variable.shape))` (the
    layout change) and assigns it (keras-hub 0.32.0 with Keras 3.15, and
    0.33.dev with 3.16.dev: the same classes and signatures). Here a
    `SafetensorLoader` subclass calls `port(hf_weight_key, shape, load)`,
    where `load()` returns the tensor in Keras's layout for `shape`; where
    `port` returns True the tensor is taken care of, else it is assigned as
    keras-hub does.

    Args:
        backbone: a backbone built from `model_dir`'s config (e.g. with
            `from_preset(model_dir, load_weights=False)`).
        model_dir: a Hugging Face directory (config.json, safetensors).
        port: `(hf_weight_key, keras_shape, load) -> handled`.
    """
    from keras_hub.src.utils.transformers.preset_loader import (
        TransformersPresetLoader,
    )
    from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader

    class PortingLoader(SafetensorLoader):
        def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
            shape = list(keras_variable.shape)

            def load():
                tensor = self.get_tensor(hf_weight_key)
                return hook_fn(tensor, shape) if hook_fn else tensor

            if not port(hf_weight_key, shape, load):
                super().port_weight(keras_variable, hf_weight_key, hook_fn)

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    converter = TransformersPresetLoader(model_dir, config).converter
    with PortingLoader(model_dir) as loader:
        converter.convert_weights(backbone, loader, config)


def preset_backbone_class(preset: str) -> str:
    """The backbone class name a keras-hub preset's config.json names
    ("Llama3Backbone"), for a local directory or a preset name.

    Reads it with keras-hub's `keras_hub.src.utils.preset_utils.load_json`
    (which fetches a named preset's file as `from_preset` does; keras-hub
    0.32.0 with Keras 3.15, and 0.33.dev with 3.16.dev), its
    `registered_name` ("keras_hub>Llama3Backbone").

    Args:
        preset: a keras-hub preset name or `save_to_preset` directory.
    """
    from keras_hub.src.utils.preset_utils import load_json

    return load_json(preset)["registered_name"].rpartition(">")[2]
