"""LoRA over a frozen base stored in half precision (full bfloat16/float16)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lora import inject_lora, lora_layers, merge_lora
from tests.helpers import constant_token_task, dtype_policy, learnable_lm, to_numpy

STEPS = 30


@pytest.mark.parametrize("policy", ("bfloat16", "float16"))
def test_half_precision_base_trains_float32_factors(policy):
    with dtype_policy(policy):
        keras.utils.set_random_seed(0)
        lm = learnable_lm()
    inject_lora(lm, seed=0)
    wrapped = lora_layers(lm)
    for layer in wrapped:
        # Not mixed: the frozen kernel itself is half precision.
        assert layer.original_layer.kernel.dtype == policy
        assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"
        assert layer.compute_dtype == policy
    x, y, w = constant_token_task()
    frozen = {v.path: to_numpy(v.value).copy() for v in lm.weights if not v.trainable}
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    losses = lm.fit(
        x, y, sample_weight=w, epochs=STEPS + 1, batch_size=len(y), verbose=0
    ).history["loss"]
    assert np.isfinite(losses).all()
    assert losses[STEPS] < 0.6 * losses[0], losses
    for v in lm.weights:
        if not v.trainable:
            np.testing.assert_array_equal(to_numpy(v.value), frozen[v.path])
    layer = wrapped[0]
    assert layer.lora_a.dtype == "float32"
    assert np.abs(to_numpy(layer.lora_b.value)).max() > 0
    # The LoRA path runs in the compute dtype.
    hidden = keras.random.normal((2, 3, layer.split.fan_in), dtype=policy)
    assert keras.backend.standardize_dtype(layer.lora_update(hidden).dtype) == policy
    assert keras.backend.standardize_dtype(layer(hidden).dtype) == policy

    # Merge computes in float32 and rounds once into the half kernel.
    expected = [
        to_numpy(
            ops.cast(
                ops.add(
                    ops.cast(layer.original_layer.kernel.value, "float32"),
                    layer.delta(),
                ),
                policy,
            )
        )
        for layer in wrapped
    ]
    originals = [layer.original_layer for layer in wrapped]
    merge_lora(lm)
    for original, kernel in zip(originals, expected, strict=True):
        assert original.kernel.dtype == policy
        np.testing.assert_array_equal(to_numpy(original.kernel.value), kernel)
