"""merge_lora: training with model.fit, then folding the adapter back in,
under float32 and the mixed-precision policies."""

import keras
import numpy as np
import pytest

from keras_lora import LoraLayer, inject_lora, lora_layers, merge_lora
from tests.helpers import (
    constant_token_task,
    dtype_policy,
    functional_mlp,
    learnable_lm,
    mlp,
    randomize_lora_b,
    snapshot,
    tiny_gpt2_lm,
    to_numpy,
    token_batch,
)


def test_fit_trains_only_lora_then_merge_matches():
    lm = learnable_lm()
    base_count = lm.count_params()
    base_layer_types = [type(layer).__name__ for layer in lm._flatten_layers()]
    inject_lora(lm, rank=4, alpha=8.0)
    lm.compile(
        optimizer=keras.optimizers.Adam(3e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y, weights = constant_token_task()
    before = snapshot(lm)
    history = lm.fit(x, y, sample_weight=weights, epochs=15, batch_size=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    after = snapshot(lm)
    for path, value in after.items():
        if path.endswith(("lora_a", "lora_b")):
            assert not np.array_equal(value, before[path]), path
        else:
            np.testing.assert_array_equal(value, before[path], err_msg=path)

    inputs = token_batch(seed=3)
    unmerged = to_numpy(lm(inputs))
    lm.predict_on_batch(inputs)  # traces a predict step through the wrappers
    merge_lora(lm)
    # The traced step is dropped: predict does not add the update twice.
    np.testing.assert_allclose(
        to_numpy(lm.predict_on_batch(inputs)), unmerged, atol=1e-5, rtol=0
    )
    assert lora_layers(lm) == []
    assert lm.count_params() == base_count
    assert [type(layer).__name__ for layer in lm._flatten_layers()] == base_layer_types
    np.testing.assert_allclose(to_numpy(lm(inputs)), unmerged, atol=1e-5, rtol=0)
    # The cached generation path runs on the merged model too.
    prompt = dict(inputs, padding_mask=np.array([[1] * 4 + [0] * 4] * 4, "int32"))
    generated = to_numpy(lm.generate(prompt, stop_token_ids=None)["token_ids"])
    assert generated.shape == (4, 8)
    np.testing.assert_array_equal(generated[:, :4], inputs["token_ids"][:, :4])


@pytest.mark.parametrize(
    "policy, atol",
    [("float32", 1e-5), ("mixed_float16", 2e-2), ("mixed_bfloat16", 1e-1)],
)
def test_merge_under_dtype_policies(policy, atol):
    with dtype_policy(policy):
        lm = tiny_gpt2_lm()
        inject_lora(lm, rank=4, targets=("query", "value", "feedforward_.*_dense"))
        randomize_lora_b(lm, scale=0.2)
        for layer in lora_layers(lm):
            assert layer.lora_a.dtype == layer.lora_b.dtype == "float32"
        inputs = token_batch()
        unmerged = to_numpy(lm(inputs)).astype("float32")
        kernel = lora_layers(lm)[0].original_layer.kernel
        expected_kernel = to_numpy(kernel).astype("float32") + to_numpy(
            lora_layers(lm)[0].delta()
        )
        merge_lora(lm)
        merged = to_numpy(lm(inputs)).astype("float32")
    assert lora_layers(lm) == []
    np.testing.assert_allclose(merged, unmerged, atol=atol, rtol=0)
    np.testing.assert_array_equal(
        to_numpy(kernel), expected_kernel.astype(to_numpy(kernel).dtype)
    )


def test_merge_changes_outputs_relative_to_base():
    """Guards the merge test above: B != 0 moves outputs far beyond atol."""
    lm = tiny_gpt2_lm()
    inputs = token_batch()
    base = to_numpy(lm(inputs))
    inject_lora(lm, rank=4)
    randomize_lora_b(lm, scale=0.2)
    merge_lora(lm)
    assert np.abs(to_numpy(lm(inputs)) - base).max() > 1e-2


def test_merge_keeps_activation_and_functional_graph():
    model = functional_mlp()
    inject_lora(model, rank=2, targets=("up", "down"))
    randomize_lora_b(model)
    x = np.random.default_rng(0).normal(size=(3, 12)).astype("float32")
    unmerged = to_numpy(model(x))
    merge_lora(model)
    up = model.get_layer("up")
    assert not isinstance(up, LoraLayer)
    assert up.activation is keras.activations.gelu
    np.testing.assert_allclose(to_numpy(model(x)), unmerged, atol=1e-5, rtol=0)
    # A merged model serialises and reloads as a plain model.
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), unmerged, atol=1e-5, rtol=0)


def test_merge_without_lora_raises():
    with pytest.raises(ValueError, match="no LoraLayer.*inject_lora"):
        merge_lora(mlp())


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
