"""Training with model.fit and merging the trained adapter back."""

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
    trainable_count,
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


def test_fit_on_mlp_lowers_loss():
    model = mlp()
    inject_lora(model, rank=4, alpha=8.0, targets=("hidden_.*", "logits"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 784)).astype("float32")
    y = rng.integers(0, 10, 64)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    losses = model.fit(x, y, epochs=6, batch_size=16, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert trainable_count(model) == 4 * (784 + 128 + 128 + 256 + 256 + 10)


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
