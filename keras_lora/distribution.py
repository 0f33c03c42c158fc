"""Scaling LoRA out with `keras.distribution` (JAX): `distribute_lora`.

`distribute_lora` gives LoRA factors created outside a distribution scope
the layouts they would have had inside it. The layout maps that shard a
model family Megatron-style, LoRA factors included, are family data:
`keras_lora.families.layout_map` (and `gpt2_layout_map` for GPT-2).

`keras.distribution` (`DataParallel`, `ModelParallel`) runs on the JAX
backend only. On TensorFlow, `tf.distribute.MirroredStrategy` replicates a
LoRA model like any Keras model: build, `inject_lora`, `compile` and `fit`
inside `strategy.scope()`. On torch, Keras has no distribution support and
`fit` no DDP support; torch `DistributedDataParallel` around the model,
built after `inject_lora`, with a plain torch training loop, works
(tests/test_distribution.py checks all three).
"""

from __future__ import annotations

import keras

from keras_lora import _keras_internals
from keras_lora.injection import lora_layers
from keras_lora.surgery import drop_compiled_functions


def distribute_lora(
    model: keras.layers.Layer,
    distribution: keras.distribution.Distribution | None = None,
) -> keras.layers.Layer:
    """Give every LoRA factor the layout `distribution` assigns it.

    Keras lays a variable out when it is created, from the distribution
    active then. `inject_lora` and `load_adapter` create the LoRA factors,
    so inside `distribution.scope()` (or after
    `keras.distribution.set_distribution`) they are laid out already and
    this is not needed. Called on factors created outside any
    distribution (single-device arrays, which a distributed `fit` refuses
    to mix with sharded ones), it lays them out as the distribution says
    (the layout map's key for a `ModelParallel`, replicated for a
    `DataParallel`) and records the layout on the variable, so later
    `assign`s (`load_adapter`, `set_weights`) and optimizer slots follow
    it. Call it before the model's first `fit` after injection; a
    compiled step built for the old layouts is dropped.

    JAX backend only (like `keras.distribution`).

    Args:
        model: a model with `LoraLayer`s whose base weights are already
            distributed (built inside the distribution's scope).
        distribution: a `keras.distribution.Distribution`; defaults to the
            active one.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: on a backend other than JAX, with no distribution given
            or active, or for a model without LoRA layers.
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            "keras.distribution runs on the JAX backend only; this is "
            f"{keras.backend.backend()!r}. On TensorFlow, build the model and "
            "call inject_lora inside tf.distribute.MirroredStrategy().scope()."
        )
    distribution = distribution or keras.distribution.distribution()
    if distribution is None:
        raise ValueError(
            "distribute_lora needs a distribution: pass one, or call it inside "
            "`distribution.scope()` or after `keras.distribution."
            "set_distribution(distribution)`."
        )
    wrapped = lora_layers(model)
    if not wrapped:
        raise ValueError(
            f"Model '{model.name}' has no LoraLayer to distribute. Call "
            "`inject_lora(model)` (or `load_adapter`) first."
        )
    for layer in wrapped:
        for variable in (layer.lora_a, layer.lora_b):
            # A layout set earlier (by another distribution) would be
            # returned as it is: ask for this distribution's.
            _keras_internals.lay_out_variable(variable, distribution)
            variable.assign(variable.value)  # Lays the value out.
    drop_compiled_functions(model)
    return model
