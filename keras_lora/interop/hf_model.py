"""Merged models as Hugging Face model directories (keras-hub's exporter).

After `merge_lora` a model holds plain base weights again, so keras-hub's
own transformers exporter (`export_to_transformers`) writes it; this module
checks that the model is merged and of a known family, and makes the write
all-or-nothing.

The projections' weights are then rewritten from the family data
(`Projection.axes`, through `keras_lora.interop.hf_layout`), the same map
PEFT exchange uses: keras-hub 0.32's Gemma exporter reshapes the query
kernel wrongly unless heads * head_dim == hidden, and keeps only the first
key/value head, so a Gemma with grouped-query attention would not load (or
would load wrong). For the other families the rewrite writes what
keras-hub wrote.
"""

from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import safetensors.numpy

from keras_lora.families import family_of
from keras_lora.files import staging_directory
from keras_lora.injection import lora_layers
from keras_lora.interop.peft_modules import locate


def export_hf_model(model: keras.layers.Layer, path: str | os.PathLike) -> str:
    """Save a merged keras-hub model as a Hugging Face model directory.

    A task model (`GPT2CausalLM`, `Llama3CausalLM`, `MistralCausalLM`,
    `QwenCausalLM`, `GemmaCausalLM`, ...) is written with its output head
    (and its tokenizer, if it has a preprocessor), so that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it and
    computes the same logits; a backbone is written without a head
    (`AutoModel`). The files (config.json, model.safetensors, ...) are what
    keras-hub's own exporter writes; they are written into a temporary
    directory first and moved into `path` only when all are complete.

    Args:
        model: a keras-hub task model or backbone of a family in
            `keras_lora.families`, with its LoRA merged (`merge_lora`).
        path: the directory to write (created if needed; files of the
            same names are replaced).

    Returns:
        The directory path, as a string.

    Raises:
        ValueError: if the model still has `LoraLayer`s (call `merge_lora`
            first), is of no known family, or keras-hub has no exporter
            for its architecture (keras-hub exports `Llama3Backbone`, not
            the original `LlamaBackbone`, for example) or writes it as
            another one (Gemma 2: see `Family.hf_export_requires`).

    Example (a tiny random GPT-2; `transformers.AutoModelForCausalLM`
    loads the directory):

    >>> import os, tempfile, keras_hub
    >>> from keras_lora import inject_lora, merge_lora
    >>> backbone = keras_hub.models.GPT2Backbone(
    ...     vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=16)
    >>> lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    >>> lm = merge_lora(inject_lora(lm, rank=2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     sorted(os.listdir(export_hf_model(lm, os.path.join(tmp, "merged"))))
    ['config.json', 'model.safetensors']
    """
    family = family_of(model)
    if lora_layers(model):
        raise ValueError(
            f"Model '{model.name}' still has LoraLayers; a Hugging Face model "
            "directory holds plain weights. Call `merge_lora(model)` first (or "
            "`export_peft` to save the adapter alone)."
        )
    check_hf_exportable(model)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = staging_directory(parent, ".tmp-hf-")
    try:
        try:
            model.export_to_transformers(staging)
        except ValueError as e:
            raise ValueError(
                f"keras-hub cannot export this {family.label} model "
                f"({type(getattr(model, 'backbone', model)).__name__}) to "
                f"transformers: {e}"
            ) from None
        _rewrite_projections(model, staging)
        os.makedirs(path, exist_ok=True)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def check_hf_exportable(model: keras.layers.Layer) -> None:
    """Raise unless keras-hub can export `model`'s architecture faithfully.

    What `export_hf_model` checks before it writes anything, for callers
    that want the answer before they train (`keras-lora sft --merged-hf`).

    Args:
        model: a keras-hub task model or backbone of a family in
            `keras_lora.families` (LoRA layers may still be in it).

    Raises:
        ValueError: as `export_hf_model`, for the model's kind.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(
    ...     vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=16)
    >>> check_hf_exportable(backbone)
    """
    family = family_of(model)
    if not hasattr(model, "export_to_transformers"):
        raise ValueError(
            f"{type(model).__name__} has no `export_to_transformers`; this "
            "keras-hub version cannot export it. Pass a keras-hub task model "
            "or backbone."
        )
    backbone = getattr(model, "backbone", model)
    config = backbone.get_config()
    unsupported = {
        key: config.get(key)
        for key, value in family.hf_export_requires.items()
        if config.get(key, value) != value
    }
    if unsupported:
        raise ValueError(
            f"keras-hub's transformers exporter cannot write this "
            f"{family.label} model faithfully: it needs "
            f"{ {k: family.hf_export_requires[k] for k in unsupported} } but the "
            f"backbone has {unsupported} (a Gemma 2 is written as a Gemma). "
            "Save the adapter with `export_peft` and merge it in PEFT instead."
        )


def _rewrite_projections(model, directory: str) -> None:
    """Write every unfused projection's weight from the family data."""
    found = locate(model)
    family = found.family
    if family.fan_in_fan_out:  # GPT-2's fused Conv1D: keras-hub's map stands.
        return
    weights_path = os.path.join(directory, "model.safetensors")
    tensors = safetensors.numpy.load_file(weights_path)
    # Backbones export without a model prefix ("layers.0..."), task models
    # with their first class's ("model.layers.0...").
    prefixes = sorted(set(family.hf_model_prefixes.values()), key=len, reverse=True)
    for block in range(found.num_blocks):
        for module, roles in family.hf_modules.items():
            if len(roles) != 1:
                continue
            name = f"{family.hf_block.format(block=block)}.{module}.weight"
            key = next((p + name for p in prefixes if p + name in tensors), None)
            if key is None:
                raise ValueError(
                    f"keras-hub's exporter wrote no '{name}' for this "
                    f"{family.label} model; it cannot be exported."
                )
            layer = found.layer(block, roles[0])
            kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel))
            weight = found.hf_layout(block, roles[0]).kernel_to_hf(kernel)
            tensors[key] = np.ascontiguousarray(weight.astype(tensors[key].dtype))
    safetensors.numpy.save_file(tensors, weights_path, metadata={"format": "pt"})
