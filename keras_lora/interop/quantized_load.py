"""Load a Hugging Face checkpoint into a keras-hub causal LM whose
projections are built quantized: no float copy of them ever exists.

`model.quantize(mode)` after `from_preset` holds the whole float model for
a moment, and on a small machine that moment is the memory high-water
mark. Here the backbone is built from the checkpoint's config with every
block projection int8/int4 from the start
(`keras_lora.families.quantized_paths`), then keras-hub's own converter
reads the checkpoint tensor by tensor
(`keras_lora._keras_internals.hub.convert_hf_weights`): a projection's float
kernel is quantized into its layer as it arrives
(`keras_lora.quantized.fill_quantized`, one layer's float at a time), every
other tensor is assigned as keras-hub does. The token embedding (and an
untied output head) is then quantized in place. The result equals
`from_preset` followed by `model.quantize(mode)`.

Which layer a checkpoint tensor fills is the family's data: the block's
Hugging Face path (`Family.hf_block`) and each projection's module
(`Projection.hf_module`). A tensor several projections share (GPT-2's fused
`c_attn`) fills them in the family's projection order, the order keras-hub's
converter reads it in (tests/test_quantized_load.py compares every family
with `model.quantize`, so a change there is caught).
"""

from __future__ import annotations

import collections
import json
import os
import warnings

import keras

from keras_lora import _keras_internals
from keras_lora._keras_internals.hub import convert_hf_weights, preset_backbone_class
from keras_lora.families import Family, family_of_class, hf_family, projection_paths
from keras_lora.interop.peft_modules import hf_module_name, locate
from keras_lora.quantized import (
    check_buildable_mode,
    fill_quantized,
    quantized_dtype_policy,
)

__all__ = ["load_quantized_causal_lm", "load_quantized_preset"]


def load_quantized_causal_lm(model_dir: str, mode: str) -> keras.Model:
    """The keras-hub causal LM of a Hugging Face directory, quantized to
    `mode` without a float copy of its projections.

    Args:
        model_dir: config.json + safetensors of a family keras-lora knows.
        mode: "int8" or "int4".

    Returns:
        The keras-hub `CausalLM` (no preprocessor), its projections and
        token embedding quantized.

    Raises:
        ValueError: for another mode, a config of no known family, or a
            checkpoint without a tensor for some projection.
    """
    import keras_hub

    check_buildable_mode(mode)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        architectures = json.load(f).get("architectures")
    family = hf_family(architectures)
    if family is None:
        raise ValueError(
            f"{model_dir}/config.json names architectures {architectures}, of "
            "no family keras-lora knows"
        )
    lm = keras_hub.models.CausalLM.from_preset(
        model_dir,
        preprocessor=None,
        load_weights=False,
        dtype=quantized_dtype_policy(mode, projection_paths(family)),
    )
    waiting = _projections_by_hf_key(lm)

    def port(hf_key: str, shape: list[int], load) -> bool:
        parts = hf_key.split(".")
        for start in range(len(parts)):
            queue = waiting.get(".".join(parts[start:]))
            if queue:
                fill_quantized(queue.popleft(), load())
                return True
        return False

    convert_hf_weights(lm.backbone, model_dir, port)
    missing = [layer.path for queue in waiting.values() for layer in queue]
    if missing:
        raise ValueError(
            f"{model_dir}: the checkpoint has no tensor for {', '.join(missing)}"
        )
    _quantize_embedding(lm, family, mode)
    return lm


def load_quantized_preset(preset: str, mode: str) -> keras.Model:
    """The keras-hub causal LM of a keras-hub preset saved in float,
    quantized to `mode` without a float copy of its projections.

    The projections are built quantized, and Keras's `load_weights` hands
    each one's saved float kernel and bias to
    `keras_lora.quantized.fill_quantized` as it reaches the layer
    (`keras_lora._keras_internals.loading_float_kernels`); the token
    embedding is loaded float and quantized after. The result equals
    `from_preset` followed by `model.quantize(mode)`.

    Args:
        preset: a keras-hub preset name or `save_to_preset` directory of a
            family keras-lora knows.
        mode: "int8" or "int4".

    Returns:
        The keras-hub `CausalLM` (no preprocessor).

    Raises:
        ValueError: for another mode or a backbone of no known family.
    """
    import keras_hub

    check_buildable_mode(mode)
    family = _preset_family(preset)

    def fill(layer, kernel, bias) -> None:
        if bias is not None:
            layer.bias.assign(bias)
        fill_quantized(layer, kernel)

    with _keras_internals.loading_float_kernels(fill):
        lm = keras_hub.models.CausalLM.from_preset(
            preset,
            preprocessor=None,
            dtype=quantized_dtype_policy(mode, projection_paths(family)),
        )
    _quantize_embedding(lm, family, mode)
    return lm


def _preset_family(preset: str) -> Family:
    import keras_hub

    name = preset_backbone_class(preset)
    cls = getattr(keras_hub.models, name, None)
    family = family_of_class(cls) if cls is not None else None
    if family is not None:
        return family
    raise ValueError(f"preset {preset} has a {name}, of no family keras-lora knows")


def _quantize_embedding(lm: keras.Model, family: Family, mode: str) -> None:
    """Quantize the token embedding (and a tied or untied output head),
    which was loaded float."""
    embedding = lm.backbone.get_layer(family.embedding)
    _keras_internals.take_policy_from_map(embedding)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Layer .* does not have a `quantize`")
        embedding.quantize(mode)


def _projections_by_hf_key(lm: keras.Model) -> dict:
    """Hugging Face weight key (no model prefix) -> the layers it fills, in
    the family's projection order."""
    found = locate(lm)
    waiting = collections.defaultdict(collections.deque)
    for block in range(found.num_blocks):
        keras_block = found.family.block.format(block=block)
        for projection in found.family.projections:
            hf_module = hf_module_name(found.family, block, projection.hf_module)
            layer = found.layers[f"{keras_block}/{projection.path}"]
            waiting[f"{hf_module}.weight"].append(layer)
    return dict(waiting)
