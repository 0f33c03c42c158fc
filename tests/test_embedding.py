"""LoRA on embeddings (`LoraEmbedding`): lookup, tied head, merge, files.

PEFT exchange (GPT-2's `wte`, Llama's `embed_tokens`) is in
`tests/test_embedding_peft.py`.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lora import (
    AdapterCheckpoint,
    LoraEmbedding,
    LoraPlusOptimizer,
    adapter_batch,
    add_weighted_adapter,
    disable_lora,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    set_adapter,
)
from tests.helpers import (
    constant_token_task,
    dtype_policy,
    learnable_lm,
    snapshot,
    tiny_gpt2_lm,
    to_numpy,
    token_batch,
)

TARGETS = ("query", "value", "token_embedding")


def logits(lm, batch):
    return to_numpy(lm(batch, training=False))


def set_factors(layer, seed=0, scale=0.3):
    """Non-zero A and B (a fresh A is zero), as training would leave them."""
    rng = np.random.default_rng(seed)
    for factor in (layer.lora_a, layer.lora_b):
        shape = tuple(factor.shape)
        factor.assign(rng.normal(0, scale, shape).astype("float32"))


def twin_lms():
    """Two tiny GPT-2 LMs with the same base weights."""
    first, second = learnable_lm(), tiny_gpt2_lm()
    second.set_weights(first.get_weights())
    return first, second


def assert_unchanged(before, model):
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


def test_fresh_adapter_is_an_exact_no_op_and_only_factors_train():
    lm = learnable_lm()
    batch = token_batch()
    base = logits(lm, batch)
    inject_lora(lm, rank=4, alpha=8.0, targets=TARGETS)
    emb = lm.backbone.token_embedding
    assert isinstance(emb, LoraEmbedding) and emb.tied
    assert [type(x).__name__ for x in lora_layers(lm)][0] == "LoraEmbedding"
    # PEFT's layout, transposed: A (vocab, r) zeros, B (r, dim) normal.
    assert tuple(emb.lora_a.shape) == (64, 4) and tuple(emb.lora_b.shape) == (4, 16)
    assert not np.any(to_numpy(emb.lora_a)) and np.std(to_numpy(emb.lora_b)) > 0.5
    np.testing.assert_array_equal(logits(lm, batch), base)
    names = sorted(w.path for w in lm.trainable_weights)
    assert names[:2] == ["token_embedding/lora_a", "token_embedding/lora_b"]
    assert all(n.rpartition("/")[2] in ("lora_a", "lora_b") for n in names)
    assert not emb.original_layer.embeddings.trainable


def test_training_lowers_the_loss_and_changes_only_the_factors():
    lm = learnable_lm()
    inject_lora(lm, rank=4, alpha=8.0, targets="token_embedding")
    x, y, w = constant_token_task()
    lm.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = snapshot(lm)
    history = lm.fit(x, y, sample_weight=w, batch_size=8, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.05
    after = snapshot(lm)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == ["token_embedding/lora_a", "token_embedding/lora_b"]


def test_tied_head_gets_the_update_and_merge_is_exact():
    lm, merged_by_hand = twin_lms()
    batch = token_batch()
    inject_lora(lm, rank=4, alpha=8.0, targets="token_embedding")
    emb = lm.backbone.token_embedding
    set_factors(emb)
    adapted = logits(lm, batch)
    # Lookup-only update: the adapted hidden states through the base head.
    hidden = lm.backbone(batch, training=False)
    lookup_only = to_numpy(emb.original_layer(hidden, reverse=True))
    assert np.max(np.abs(adapted - lookup_only)) > 1e-2
    # The same model as a table plus scale * A·B, tied head included.
    table = merged_by_hand.backbone.token_embedding.embeddings
    delta = emb.scale * to_numpy(emb.lora_a) @ to_numpy(emb.lora_b)
    table.assign(to_numpy(table) + delta)
    np.testing.assert_allclose(adapted, logits(merged_by_hand, batch), atol=1e-5)

    merge_lora(lm)
    assert not lora_layers(lm)
    assert type(lm.backbone.token_embedding).__name__ == "ReversibleEmbedding"
    np.testing.assert_allclose(logits(lm, batch), adapted, rtol=0, atol=1e-5)
    assert len(lm.weights) == len(merged_by_hand.weights)


def test_plain_embedding_in_a_functional_model(tmp_path):
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="emb")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (16, 5)).astype("int32")
    y = rng.normal(0, 1, (16, 3)).astype("float32")
    base = to_numpy(model(ids))
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    inject_lora(model, rank=2, alpha=4.0, targets="emb")
    np.testing.assert_array_equal(to_numpy(model(ids)), base)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    first = float(model.evaluate(ids, y, verbose=0))
    checkpoint = AdapterCheckpoint(tmp_path / "checkpoints", every_n_steps=5)
    model.fit(ids, y, batch_size=16, epochs=10, callbacks=[checkpoint], verbose=0)
    assert float(model.evaluate(ids, y, verbose=0)) < first
    trained = to_numpy(model(ids))
    assert np.max(np.abs(trained - base)) > 1e-3
    # The last checkpoint holds the trained factors, exactly.
    load_adapter(twin, checkpoint.latest)
    for ours, theirs in zip(lora_layers(model), lora_layers(twin), strict=True):
        np.testing.assert_array_equal(to_numpy(ours.lora_a), to_numpy(theirs.lora_a))
        np.testing.assert_array_equal(to_numpy(ours.lora_b), to_numpy(theirs.lora_b))
    np.testing.assert_allclose(to_numpy(twin(ids)), trained, rtol=0, atol=1e-6)

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("emb"), LoraEmbedding)
    np.testing.assert_allclose(to_numpy(loaded(ids)), trained, atol=1e-6)

    merge_lora(model)
    assert type(model.get_layer("emb")) is keras.layers.Embedding
    np.testing.assert_allclose(to_numpy(model(ids)), trained, rtol=0, atol=1e-5)


def test_adapter_file_round_trip_is_exact(tmp_path):
    lm, other = twin_lms()
    batch = token_batch()
    inject_lora(lm, rank=3, alpha=6.0, targets=TARGETS)
    for layer in lora_layers(lm):
        set_factors(layer, scale=0.2)
    expected = logits(lm, batch)
    path = save_adapter(lm, tmp_path / "adapter")
    load_adapter(other, path)
    emb = other.backbone.token_embedding
    assert isinstance(emb, LoraEmbedding) and emb.rank == 3 and emb.alpha == 6.0
    ours = lm.backbone.token_embedding
    np.testing.assert_array_equal(to_numpy(emb.lora_a), to_numpy(ours.lora_a))
    np.testing.assert_array_equal(to_numpy(emb.lora_b), to_numpy(ours.lora_b))
    np.testing.assert_allclose(logits(other, batch), expected, rtol=0, atol=1e-6)


def test_lora_plus_ratio_applies_to_the_embedding_b():
    def one_step(optimizer):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,), dtype="int32")
        x = keras.layers.Embedding(10, 6, name="emb")(inputs)
        outputs = keras.layers.Dense(2, name="head")(x)
        model = keras.Model(inputs, outputs)
        inject_lora(model, rank=2, targets="emb", seed=1)
        set_factors(model.get_layer("emb"))  # A non-zero: B gets a gradient.
        before = {v.name: to_numpy(v.value).copy() for v in model.trainable_weights}
        model.compile(optimizer=optimizer, loss="mse")
        rng = np.random.default_rng(1)
        ids = rng.integers(0, 10, (8, 4)).astype("int32")
        model.fit(ids, rng.normal(0, 1, (8, 4, 2)), batch_size=8, verbose=0)
        return {
            v.name: to_numpy(v.value) - before[v.name] for v in model.trainable_weights
        }

    plain = one_step(keras.optimizers.SGD(0.1))
    plus = one_step(LoraPlusOptimizer(keras.optimizers.SGD(0.1), ratio=4))
    assert sorted(plain) == ["lora_a", "lora_b"]
    for name, factor in (("lora_a", 1.0), ("lora_b", 4.0)):
        assert np.abs(plain[name]).max() > 1e-3
        np.testing.assert_allclose(plus[name], factor * plain[name], atol=1e-6)


def test_named_adapters_switch_disable_and_mix_rows():
    lm = learnable_lm()
    batch = token_batch(batch=2)
    base = logits(lm, batch)
    inject_lora(lm, rank=2, targets="token_embedding")
    inject_lora(lm, rank=3, targets="token_embedding", adapter_name="b")
    emb = lm.backbone.token_embedding
    assert emb.adapters.names == ("default", "b")
    # The second adapter starts as PEFT's too: A zeros, B normal.
    assert not np.any(to_numpy(emb.adapters["b"].lora_a))
    rng = np.random.default_rng(0)
    for adapter in emb.adapters.by_name.values():
        shape = tuple(adapter.lora_a.shape)
        adapter.lora_a.assign(rng.normal(0, 0.01, shape).astype("float32"))
    default = logits(lm, batch)
    set_adapter(lm, "b")
    only_b = logits(lm, batch)
    assert np.max(np.abs(only_b - default)) > 1e-1
    assert [w.name for w in lm.trainable_weights] == ["lora_a_b", "lora_b_b"]
    with disable_lora(lm):
        np.testing.assert_allclose(logits(lm, batch), base, rtol=0, atol=1e-6)
    with adapter_batch(lm, ["default", None]):
        mixed = logits(lm, batch)
    np.testing.assert_allclose(mixed[0], default[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mixed[1], base[1], rtol=0, atol=1e-5)
    set_adapter(lm, ["default", "b"])
    both = logits(lm, batch)
    add_weighted_adapter(lm, ["default", "b"], [1.0, 1.0], "mix")
    assert emb.adapters["mix"].rank == 5
    set_adapter(lm, "mix")
    np.testing.assert_allclose(logits(lm, batch), both, rtol=0, atol=1e-4)
    merge_lora(lm, adapter_names="b")
    np.testing.assert_allclose(logits(lm, batch), only_b, rtol=0, atol=1e-5)


def test_soft_cap_goes_on_after_the_update():
    layer = keras.layers.ReversibleEmbedding(12, 4, logit_soft_cap=2.0)
    layer.build((None,))
    table = to_numpy(layer.embeddings).copy()
    wrapped = LoraEmbedding(layer, rank=2, alpha=2.0)
    set_factors(wrapped, scale=1.0)
    h = np.random.default_rng(0).normal(0, 3, (3, 4)).astype("float32")
    full = table + to_numpy(wrapped.lora_a) @ to_numpy(wrapped.lora_b)
    expected = 2.0 * np.tanh(h @ full.T / 2.0)
    np.testing.assert_allclose(to_numpy(wrapped(h, reverse=True)), expected, atol=1e-5)


def test_untied_head_adapts_the_lookup_only():
    layer = keras.layers.ReversibleEmbedding(12, 4, tie_weights=False)
    layer.build((None,))
    h = np.random.default_rng(0).normal(0, 1, (3, 4)).astype("float32")
    ids = ops.convert_to_tensor([[1, 5, 7]])
    head, lookup = to_numpy(layer(h, reverse=True)), to_numpy(layer(ids))
    wrapped = LoraEmbedding(layer, rank=2)
    assert not wrapped.tied
    set_factors(wrapped)
    np.testing.assert_array_equal(to_numpy(wrapped(h, reverse=True)), head)
    assert np.max(np.abs(to_numpy(wrapped(ids)) - lookup)) > 1e-2


def test_config_round_trip():
    layer = keras.layers.Embedding(10, 4, name="emb")
    layer.build((None,))
    wrapped = LoraEmbedding(layer, rank=3, alpha=5.0, use_rslora=True)
    again = LoraEmbedding.from_config(wrapped.get_config())
    assert (again.rank, again.alpha, again.use_rslora) == (3, 5.0, True)
    assert again.scale == pytest.approx(5.0 / np.sqrt(3))
    assert type(again.original_layer) is keras.layers.Embedding


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(init="pissa"), "PiSSA"),
        (dict(init="olora"), "PiSSA"),
    ],
)
def test_refusals_leave_the_model_unchanged(kwargs, match):
    lm = tiny_gpt2_lm()
    before = snapshot(lm)
    with pytest.raises(ValueError, match=match):
        inject_lora(lm, rank=2, targets=TARGETS, **kwargs)
    assert not lora_layers(lm)
    assert_unchanged(before, lm)


def test_quantized_embedding_is_refused():
    lm = tiny_gpt2_lm()
    lm.quantize("int8")
    before = snapshot(lm)
    with pytest.raises(ValueError, match="quantized"):
        inject_lora(lm, rank=2, targets="token_embedding")
    assert not lora_layers(lm)
    assert_unchanged(before, lm)


def test_dora_beside_an_embedding_adapter_is_refused():
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2, targets="token_embedding")
    before = snapshot(lm)
    with pytest.raises(ValueError, match="DoRA"):
        inject_lora(lm, targets="token_embedding", adapter_name="d", use_dora=True)
    assert lm.backbone.token_embedding.adapters.names == ("default",)
    assert_unchanged(before, lm)


def test_embeddings_are_not_all_linear_but_can_join_it_and_are_candidates():
    lm = tiny_gpt2_lm()
    inject_lora(lm, targets="all-linear")
    linear = [x.name for x in lora_layers(lm)]
    assert not any(isinstance(x, LoraEmbedding) for x in lora_layers(lm))
    # Named beside "all-linear", the embedding is added to those layers.
    both = inject_lora(tiny_gpt2_lm(), targets=("all-linear", "token_embedding"))
    embeddings = [x for x in lora_layers(both) if isinstance(x, LoraEmbedding)]
    assert [x.name for x in embeddings] == ["token_embedding"]
    assert sorted(x.name for x in lora_layers(both)) == sorted(
        [*linear, "token_embedding"]
    )
    with pytest.raises(ValueError, match="token_embedding"):
        inject_lora(tiny_gpt2_lm(), targets="no_such_layer")


def test_mixed_precision_keeps_float32_factors_and_trains():
    with dtype_policy("mixed_bfloat16"):
        # A tied lookup and head, as GPT-2's, in a small functional model.
        inputs = keras.Input((4,), dtype="int32")
        emb = keras.layers.ReversibleEmbedding(12, 8, name="emb")
        hidden = keras.layers.Dense(8, name="mix")(emb(inputs))
        model = keras.Model(inputs, emb(hidden, reverse=True))
        inject_lora(model, rank=2, targets="emb")
    wrapped = model.get_layer("emb")
    assert wrapped.lora_a.dtype == "float32" and wrapped.lora_b.dtype == "float32"
    set_factors(wrapped, scale=0.1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 12, (8, 4)).astype("int32")
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = to_numpy(wrapped.lora_a).copy()
    model.fit(ids, ids, batch_size=8, epochs=1, verbose=0)
    assert np.all(np.isfinite(to_numpy(model(ids))))
    assert np.max(np.abs(to_numpy(wrapped.lora_a) - before)) > 0
