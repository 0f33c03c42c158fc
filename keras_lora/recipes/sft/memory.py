"""The memory-budget and scale-out options of `keras-lora sft`.

- `--quantize int8|int4`: the base loads with its projections built
  quantized and its token embedding quantized after
  (`keras_lora.interop.quantized_load`, from a Hugging Face directory or
  a keras-hub preset) before LoRA is injected; LoRA's factors stay float
  beside the quantized kernels (`keras_lora.quantized`), and the PEFT
  export is for the float base.
- `--remat`: every decoder block recomputes its activations in the
  backward pass (`keras_lora.remat_layers`).
- `--chunked-loss N`: `fit` trains a `keras_lora.ChunkedCausalLM` over the
  model, whose loss computes the logits N pieces of the sequence at a time,
  with the sft loss mask as its sample weight and the "sum" reduction of the
  plain path (`batches`); evaluation keeps the full logits.
- `--distribution data|model` (JAX): `keras.distribution.DataParallel` over
  every device JAX sees, or `ModelParallel` with the family's layout map
  (`keras_lora.families.layout_map`) on a mesh (batch, model) whose model
  axis is the largest divisor of the device count that divides the
  key/value heads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import keras

from keras_lora import ChunkedCausalLM, chunked_causal_lm, remat_layers
from keras_lora.families import Family, hf_family, layout_map
from keras_lora.interop.peft_modules import locate
from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.packed_model import packed_causal_lm

__all__ = [
    "distribution_scope",
    "make_distribution",
    "training_model",
]


def training_model(
    lm: keras.Model, config: SftConfig, optimizer: keras.optimizers.Optimizer
) -> keras.Model:
    """The model `fit` trains, compiled: `lm`, its packed form
    (`config.packing`: `packed_model.packed_causal_lm`) or a
    `ChunkedCausalLM` over it (`config.chunked_loss`), with its blocks
    rematerialised (`config.remat`). `lm` itself is compiled with the greedy
    sampler the run's generations use.

    Each computes the mean cross-entropy over each batch's label tokens from
    `batches.make_batches`' targets and normalised sample weights ("sum"
    reduction); the wrapper shares `lm`'s layers, so training it trains `lm`.

    Args:
        lm: the keras-hub causal LM with its LoRA layers.
        config: the run's settings.
        optimizer: the optimizer to compile with.

    Returns:
        The compiled model to `fit`.
    """
    if config.remat:
        found = locate(lm)
        blocks = [
            found.layers[found.family.block.format(block=i)]
            for i in range(found.num_blocks)
        ]
        remat_layers(blocks)
    # Greedy: the run's generations (`recipes.sft.generation`) use `lm`'s
    # sampler, whichever model trains.
    if config.packing:
        lm.compile(sampler="greedy")
        packed = packed_causal_lm(lm)
        packed.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="sum"
            ),
        )
        return packed
    if config.chunked_loss is None:
        lm.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="sum"
            ),
            sampler="greedy",
        )
        return lm
    lm.compile(sampler="greedy")
    trainer: ChunkedCausalLM = chunked_causal_lm(
        lm, num_chunks=config.chunked_loss, reduction="sum"
    )
    trainer.compile(optimizer=optimizer)
    return trainer


def make_distribution(config: SftConfig) -> keras.distribution.Distribution | None:
    """The run's `keras.distribution`, its batch checked; None without one.

    Args:
        config: the run's settings (`distribution`, `batch`, `model`).

    Returns:
        A `DataParallel` over every device, a `ModelParallel` with the
        family's layout map, or None.

    Raises:
        ValueError: when `config.batch` does not divide over the
            data-parallel replicas, or the model is of no known family.

    Example:

    >>> make_distribution(SftConfig("m", "d.jsonl", "o")) is None
    True
    """
    if config.distribution is None:
        return None
    devices = keras.distribution.list_devices()
    if config.distribution == "data":
        model_size = 1
        distribution = keras.distribution.DataParallel(devices=devices)
    else:
        hf_config = _hf_config(config.model)
        family = _family(hf_config, config.model)
        heads = hf_config.get(
            "num_key_value_heads",
            hf_config.get("num_attention_heads", hf_config.get("n_head", 1)),
        )
        model_size = math.gcd(len(devices), int(heads))
        mesh = keras.distribution.DeviceMesh(
            (len(devices) // model_size, model_size), ("batch", "model"), devices
        )
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map(family, mesh), batch_dim_name="batch"
        )
    replicas = len(devices) // model_size
    if config.batch % replicas:
        raise ValueError(
            f"--batch {config.batch} does not split over the {replicas} "
            f"data-parallel replicas of --distribution {config.distribution} "
            f"({len(devices)} devices, model axis {model_size}): give a "
            f"multiple of {replicas}"
        )
    return distribution


def distribution_scope(config: SftConfig) -> contextlib.AbstractContextManager:
    """`make_distribution(config)`'s scope, or a scope that does nothing.

    Args:
        config: the run's settings.
    """
    distribution = make_distribution(config)
    if distribution is None:
        return contextlib.nullcontext()
    return distribution.scope()


def _hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{model_dir} has no config.json: training needs the model's "
            "weights too (a Hugging Face directory saved with save_pretrained)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _family(hf_config: dict, model_dir: str) -> Family:
    """The family of a Hugging Face config, by its `architectures`."""
    family = hf_family(hf_config.get("architectures"))
    if family is not None:
        return family
    raise ValueError(
        f"{model_dir}/config.json names architectures "
        f"{hf_config.get('architectures')}, of no family --distribution model "
        "has a layout map for; use --distribution data"
    )
