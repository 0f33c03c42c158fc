"""LoRA in models built inside `keras.RematScope`: same gradients as without."""

import functools

import keras
import numpy as np
import pytest

from keras_lora import inject_lora, lora_layers
from tests.helpers import (
    constant_token_task,
    learnable_lm,
    mlp,
    randomize_lora_b,
    to_numpy,
)

MODES = ("full", "activations", "larger_than")


def _factor_gradients(model, x, y, remat_mode=None):
    """Gradients of the loss for each LoRA factor, from one SGD step (lr 1)."""
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # Keras's TensorFlow remat ("full", "larger_than") uses
        # tf.custom_gradient with keyword arguments, which TensorFlow
        # accepts only eagerly: a plain Dense fails in a traced step even
        # without LoRA. Eager steps still check the LoRA gradients.
        run_eagerly=keras.backend.backend() == "tensorflow"
        and remat_mode in ("full", "larger_than"),
    )
    factors = [v for layer in lora_layers(model) for v in (layer.lora_a, layer.lora_b)]
    before = [to_numpy(v.value).copy() for v in factors]
    model.train_on_batch(x, y)
    return [b - to_numpy(v.value) for b, v in zip(before, factors, strict=True)]


def _build(make, remat_mode, targets):
    keras.utils.set_random_seed(0)
    scope = (
        keras.RematScope(mode=remat_mode, output_size_threshold=64)
        if remat_mode
        else keras.RematScope(mode=None)
    )
    # The mode is read when a layer is created: build and inject inside.
    with scope:
        model = make()
        inject_lora(model, targets=targets, seed=0)
    randomize_lora_b(model)
    return model


def _assert_same_gradients(make, remat_mode, targets, x, y):
    model = _build(make, remat_mode, targets)
    # The scope reached the layers (Keras keeps the mode per layer).
    assert all(
        getattr(layer.original_layer, "_remat_mode", None) is not None
        for layer in lora_layers(model)
    )
    plain = _factor_gradients(_build(make, None, targets), x, y)
    remat = _factor_gradients(model, x, y, remat_mode)
    for p, r in zip(plain, remat, strict=True):
        assert np.abs(p).max() > 0
        np.testing.assert_allclose(r, p, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("remat_mode", MODES)
def test_mlp_lora_gradients_equal_without_remat(remat_mode):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 784)).astype("float32")
    y = rng.integers(0, 10, 16).astype("int32")
    _assert_same_gradients(mlp, remat_mode, ("hidden_1", "hidden_2", "logits"), x, y)


def test_gpt2_lora_gradients_equal_without_remat_activations():
    # keras-hub GPT-2 fails under RematScope "full" and "larger_than" even
    # without LoRA (Keras checkpoints every layer call, and a layer inside
    # the backbone converts a traced value to a Python bool); "activations"
    # checkpoints the layers with an activation (the decoder blocks, the
    # LoRA wrappers). Dropout is off: on torch, Keras recomputes a
    # checkpointed block with a new dropout mask (its seed state has moved
    # on), so its gradients differ from a plain step.
    x, y, _ = constant_token_task()
    targets = ("query", "value", "feedforward_intermediate_dense")
    make = functools.partial(learnable_lm, dropout=0.0)
    _assert_same_gradients(make, "activations", targets, x, y)
