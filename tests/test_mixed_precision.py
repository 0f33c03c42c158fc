"""`model.fit` of a LoRA GPT-2 under mixed_float16 and mixed_bfloat16."""

import keras
import numpy as np
import pytest

from keras_lora import inject_lora, lora_layers, merge_lora
from tests.helpers import (
    constant_token_task,
    dtype_policy,
    learnable_lm,
    snapshot,
    to_numpy,
    token_batch,
)

# Merged vs unmerged logits (magnitude ~4) differ by rounding in the compute
# dtype: float16 keeps 11 significant bits, bfloat16 only 8.
POLICIES = [("mixed_float16", "float16", 2e-2), ("mixed_bfloat16", "bfloat16", 1e-1)]


@pytest.mark.parametrize(
    "policy, compute_dtype, atol", POLICIES, ids=[p[0] for p in POLICIES]
)
def test_fit_and_merge_under_mixed_precision(policy, compute_dtype, atol):
    with dtype_policy(policy):
        lm = learnable_lm()
        inject_lora(lm, rank=4, alpha=8.0, targets=("query", "value"))
        lm.compile(
            optimizer=keras.optimizers.AdamW(3e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        # Keras 3 wraps the optimizer in a LossScaleOptimizer by itself, but
        # only for float16: bfloat16 has float32's exponent range.
        scaled = isinstance(lm.optimizer, keras.optimizers.LossScaleOptimizer)
        assert scaled == (policy == "mixed_float16"), type(lm.optimizer)
        for layer in lora_layers(lm):
            assert layer.compute_dtype == compute_dtype
            assert layer.lora_a.dtype == layer.lora_b.dtype == "float32"
            assert layer.original_layer.kernel.dtype == "float32"

        x, y, weights = constant_token_task()
        inputs = token_batch(seed=3)
        initial = to_numpy(lm(inputs)).astype("float32")  # B = 0: the base model.
        before = snapshot(lm)
        # keras-hub turns arrays into a tf.data pipeline, which Keras will
        # not shuffle anyway (it warns if asked to).
        history = lm.fit(
            x,
            y,
            sample_weight=weights,
            epochs=15,
            batch_size=8,
            shuffle=False,
            verbose=0,
        )
        losses = history.history["loss"]
        assert np.all(np.isfinite(losses)), losses
        assert losses[-1] < 0.8 * losses[0], losses
        if scaled:
            # The loss scale is applied and undone each step: the scale is
            # a finite, positive float32 (it halves on overflow).
            scale = float(to_numpy(lm.optimizer.scale_loss(1.0)))
            assert np.isfinite(scale) and scale >= 1.0

        after = snapshot(lm)
        lora_paths = [p for p in after if p.endswith(("lora_a", "lora_b"))]
        assert len(lora_paths) == 2 * 2 * 2  # 2 blocks x (query, value) x (A, B)
        for path, value in after.items():
            if path in lora_paths:
                assert value.dtype == np.float32, path
                assert np.all(np.isfinite(value)), path
                assert not np.array_equal(value, before[path]), path
            else:
                np.testing.assert_array_equal(value, before[path], err_msg=path)

        unmerged = to_numpy(lm(inputs)).astype("float32")
        merge_lora(lm)
        assert lora_layers(lm) == []
        merged = to_numpy(lm(inputs)).astype("float32")
    np.testing.assert_allclose(merged, unmerged, atol=atol, rtol=0)
    # Guard: training moved the outputs far more than the tolerance.
    assert np.abs(merged - initial).max() > 10 * atol
