"""remat_layers: whole blocks recomputed in the backward pass, same gradients."""

import keras
import numpy as np
import pytest

from keras_lora import inject_lora, lora_layers, remat_layers
from tests.helpers import (
    constant_token_task,
    learnable_lm,
    randomize_lora_b,
    to_numpy,
)


def _factor_gradients(dropout, remat):
    keras.utils.set_random_seed(0)
    lm = learnable_lm(dropout=dropout)
    inject_lora(lm, targets=["query", "value"], seed=0)
    randomize_lora_b(lm)
    blocks = [lm.backbone.get_layer(f"transformer_layer_{i}") for i in range(2)]
    if remat:
        assert remat_layers(blocks) == 2
        assert remat_layers(blocks) == 0  # Already wrapped: unchanged.
    lm.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    factors = [v for layer in lora_layers(lm) for v in (layer.lora_a, layer.lora_b)]
    before = [to_numpy(v.value).copy() for v in factors]
    x, y, _ = constant_token_task()
    lm.train_on_batch(x, y)
    return [b - to_numpy(v.value) for b, v in zip(before, factors, strict=True)]


@pytest.mark.parametrize("dropout", (0.0, 0.1))
def test_block_remat_gives_the_same_lora_gradients(dropout):
    if dropout and keras.backend.backend() == "tensorflow":
        pytest.skip(
            "tf.recompute_grad reruns the block after its dropout seed "
            "advanced: a new mask (gradients equal with dropout 0)"
        )
    plain = _factor_gradients(dropout, remat=False)
    remat = _factor_gradients(dropout, remat=True)
    for p, r in zip(plain, remat, strict=True):
        assert np.abs(p).max() > 0
        np.testing.assert_allclose(r, p, rtol=1e-4, atol=1e-6)


def test_unbuilt_layer_is_refused():
    layer = keras.layers.Dense(2)
    with pytest.raises(ValueError, match="not built"):
        remat_layers([layer])
    assert not hasattr(layer, "_keras_lora_remat")
