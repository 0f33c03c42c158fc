"""Chunked causal-LM cross-entropy: same loss and gradients as the full logits."""

import keras
import numpy as np
import pytest

from keras_lora import inject_lora, lora_layers
from keras_lora.chunked_loss import (
    ChunkedCausalLM,
    chunk_bounds,
    chunked_causal_lm,
    chunked_sparse_cross_entropy,
)
from tests.helpers import learnable_lm, randomize_lora_b, to_numpy

# 3 and 4 chunks are uneven; 1, 2 and 5 equal (on JAX, equal chunks run as
# a scan over a checkpointed body).
SEQ = 10


def _task(seed=0, weighted=False):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(0, 64, (4, SEQ)).astype("int32"),
        "padding_mask": np.ones((4, SEQ), "int32"),
    }
    y = rng.integers(0, 64, (4, SEQ)).astype("int32")
    w = (rng.random((4, SEQ)) > 0.3).astype("float32") if weighted else None
    return x, y, w


def _lora_lm(full=False):
    keras.utils.set_random_seed(0)
    lm = learnable_lm()
    if full:
        return lm
    inject_lora(lm, targets=["query", "value"], seed=0)
    randomize_lora_b(lm)
    return lm


def _step_update(model, x, y, w, loss=None):
    """Weight change of one SGD (lr 1) step: minus the gradient."""
    kwargs = {"loss": loss} if loss is not None else {}
    model.compile(optimizer=keras.optimizers.SGD(1.0), **kwargs)
    variables = model.trainable_weights
    before = [to_numpy(v.value).copy() for v in variables]
    logs = model.train_on_batch(x, y, sample_weight=w, return_dict=True)
    after = [to_numpy(v.value) for v in variables]
    return logs["loss"], [b - a for b, a in zip(before, after, strict=True)]


def test_chunk_bounds_cover_the_axis_once():
    for length in (1, 7, 10, 128):
        for chunks in (1, 3, 4, 8, 200):
            bounds = chunk_bounds(length, chunks)
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(a < b for a, b in bounds)
            pairs = zip(bounds[:-1], bounds[1:], strict=True)
            assert all(b == c for (_, b), (c, _) in pairs)
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("weighted", (False, True))
def test_loss_equals_keras_cross_entropy_on_full_logits(weighted):
    lm = _lora_lm()
    x, y, w = _task(weighted=weighted)
    hidden = lm.backbone(x)
    logits = lm.backbone.token_embedding(hidden, reverse=True)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        y, logits, sample_weight=w
    )
    for chunks in (1, 2, 3, 4, 5):
        loss = chunked_sparse_cross_entropy(
            hidden,
            y,
            lambda h: lm.backbone.token_embedding(h, reverse=True),
            chunks,
            sample_weight=w,
        )
        np.testing.assert_allclose(to_numpy(loss), to_numpy(expected), rtol=1e-5)


# Each model once, each chunking once (the pairs are independent: which
# weights train vs how the loss is cut): LoRA factors over uneven chunks,
# every weight (the tied head too) over equal weighted ones.
@pytest.mark.parametrize(
    "full, weighted", ((False, False), (True, True)), ids=("lora", "full-weighted")
)
def test_fit_step_equals_the_unchunked_step(full, weighted):
    """Loss and every trainable gradient (LoRA factors, or all weights
    including the tied head) match the model trained on its full logits."""
    x, y, w = _task(weighted=weighted)
    plain = _lora_lm(full)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    plain_loss, plain_updates = _step_update(plain, x, y, w, loss)
    lm = _lora_lm(full)
    # Uneven chunks unweighted, equal ones (JAX: the scan) weighted.
    chunked = chunked_causal_lm(lm, num_chunks=5 if weighted else 3)
    chunked_loss, chunked_updates = _step_update(chunked, x, y, w)
    np.testing.assert_allclose(chunked_loss, plain_loss, rtol=1e-5)
    assert len(chunked_updates) == len(plain_updates)
    assert len(chunked_updates) == (len(lm.trainable_weights))
    for p, c in zip(plain_updates, chunked_updates, strict=True):
        assert np.abs(p).max() > 0
        np.testing.assert_allclose(c, p, rtol=1e-4, atol=1e-6)
    if not full:
        # The wrapper trained the model's own factors.
        factor = lora_layers(lm)[0].lora_b
        assert np.abs(to_numpy(factor.value)).max() > 0


def test_fit_lowers_the_loss_and_the_model_still_predicts():
    x, y, _ = _task()
    lm = _lora_lm()
    chunked = chunked_causal_lm(lm, num_chunks=4)
    chunked.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = chunked.fit(x, y, epochs=15, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.5
    logits = to_numpy(lm.predict_on_batch(x))
    assert logits.shape == (4, SEQ, 64)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    np.testing.assert_allclose(
        to_numpy(plain), to_numpy(chunked.evaluate(x, y, verbose=0)), rtol=1e-4
    )


def test_bad_input_is_refused():
    lm = _lora_lm()
    with pytest.raises(ValueError, match="num_chunks"):
        chunked_causal_lm(lm, num_chunks=0)
    with pytest.raises(ValueError, match="optimizer only"):
        chunked_causal_lm(lm).compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="token_embedding"):
        chunked_causal_lm(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="batch, seq"):
        chunked_sparse_cross_entropy(
            np.ones((2, 3), "float32"), np.ones((2, 3), "int32"), lambda h: h
        )
    assert isinstance(chunked_causal_lm(lm), ChunkedCausalLM)
