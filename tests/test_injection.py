"""inject_lora and freezing across model kinds: counts, targets, errors."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_lora import (
    freeze_non_lora,
    inject_lora,
    layer_paths,
    lora_layers,
    trainable_summary,
)
from tests.helpers import (
    count_walks,
    gpt2_base_backbone,
    mlp,
    snapshot,
    tiny_gpt2_backbone,
    tiny_gpt2_lm,
    to_numpy,
    token_batch,
    trainable_count,
)


def test_gpt2_base_parameter_counts():
    """The counts of seed 01: GPT-2 base, rank 4 on query and value."""
    backbone = gpt2_base_backbone()
    inject_lora(backbone)
    summary = trainable_summary(backbone)
    assert summary["trainable"] == 147_456
    assert summary["non_trainable"] == 124_439_808
    assert len(lora_layers(backbone)) == 24


def test_fresh_injection_changes_no_output():
    lm = tiny_gpt2_lm()
    x = token_batch()
    before = to_numpy(lm(x))
    inject_lora(lm, rank=4, targets=("query", "value", "attention_output"))
    np.testing.assert_array_equal(to_numpy(lm(x)), before)


FAMILIES = {
    "bert": lambda: keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    ),
    "gemma": lambda: keras_hub.models.GemmaBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
    ),
    "llama": lambda: keras_hub.models.LlamaBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_other_keras_hub_families(family):
    backbone = FAMILIES[family]()
    inputs = token_batch(batch=2, seq=5, vocab=50)
    if family == "bert":
        inputs["segment_ids"] = np.zeros((2, 5), "int32")

    def output():
        outputs = backbone(inputs)
        return to_numpy(outputs["sequence_output"] if family == "bert" else outputs)

    before = output()
    inject_lora(backbone, rank=2)
    wrapped = lora_layers(backbone)
    assert [layer.name for layer in wrapped] == ["query", "value"]
    np.testing.assert_array_equal(output(), before)
    lora_params = sum(
        int(np.prod(v.shape)) for layer in wrapped for v in (layer.lora_a, layer.lora_b)
    )
    assert trainable_summary(backbone)["trainable"] == lora_params
    for layer in wrapped:
        # A covers exactly the contracted hidden axis, wherever it sits.
        assert tuple(layer.lora_a.shape) == (8, 2)
        assert layer.lora_b.shape[1:] == tuple(
            d
            for d, a in zip(
                layer.original_layer.kernel.shape, layer.split.kernel_spec, strict=True
            )
            if a in layer.split.out_axes
        )


def test_sequential_mlp_by_regex():
    model = mlp()
    x = np.random.default_rng(0).normal(size=(4, 784)).astype("float32")
    before = to_numpy(model(x))
    inject_lora(model, rank=4, targets=("hidden_.*",))
    assert [layer.name for layer in lora_layers(model)] == ["hidden_1", "hidden_2"]
    assert [type(layer).__name__ for layer in model.layers] == [
        "LoraLayer",
        "LoraLayer",
        "Dense",
    ]
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    assert trainable_summary(model)["trainable"] == 4 * (784 + 128) + 4 * (128 + 256)


def test_targets_by_path_suffix_and_full_path():
    backbone = tiny_gpt2_backbone()
    assert "transformer_layer_1/self_attention/query" in layer_paths(backbone)
    inject_lora(
        backbone,
        targets=("transformer_layer_1/self_attention/query", "self_attention/value"),
    )
    wrapped = [layer.name for layer in lora_layers(backbone)]
    assert wrapped == ["value", "query", "value"]


def test_regex_targets_match_a_path_tail():
    lm = tiny_gpt2_lm()  # paths start with "gpt2_backbone/"
    inject_lora(lm, targets=("transformer_layer_[1]/.*/query", "feedforward_.*_dense"))
    wrapped = [layer.name for layer in lora_layers(lm)]
    assert wrapped == [
        "feedforward_intermediate_dense",
        "feedforward_output_dense",
        "query",
        "feedforward_intermediate_dense",
        "feedforward_output_dense",
    ]


def test_freeze_non_lora_after_user_unfreezes():
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2)
    for weight in lm.weights:
        weight.trainable = True
    summary = trainable_summary(lm)
    assert summary["trainable"] == summary["total"]
    freeze_non_lora(lm)
    names = {w.name for w in lm.trainable_weights}
    assert names == {"lora_a", "lora_b"}


BAD_INPUTS = {
    "rank_zero": (dict(rank=0), "rank"),
    "alpha_negative": (dict(alpha=-1.0), "alpha"),
    "dropout_one": (dict(dropout=1.0), "dropout"),
    "no_match": (
        dict(targets=("qkv",)),
        r"No layer matched targets \('qkv',\).*query, key, value",
    ),
    "empty_targets": (dict(targets=()), "non-empty"),
    # Token embeddings are supported (`LoraEmbedding`); position ones not.
    "unsupported_type": (dict(targets=("position_embedding",)), "PositionEmbedding"),
    "container": (dict(targets=("self_attention",)), "CachedMultiHeadAttention"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_and_leaves_model_unchanged(case):
    kwargs, message = BAD_INPUTS[case]
    lm = tiny_gpt2_lm()
    x = token_batch()
    before_out, before_weights = to_numpy(lm(x)), snapshot(lm)
    before_trainable = trainable_summary(lm)
    with pytest.raises(ValueError, match=message):
        inject_lora(lm, **kwargs)
    assert lora_layers(lm) == []
    assert trainable_summary(lm) == before_trainable
    assert snapshot(lm).keys() == before_weights.keys()
    np.testing.assert_array_equal(to_numpy(lm(x)), before_out)


def test_already_wrapped_is_refused():
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2)
    before = [id(layer) for layer in lora_layers(lm)]
    with pytest.raises(ValueError, match="already wrapped.*merge_lora"):
        inject_lora(lm, rank=2, targets=("query", "key"))
    # The key projections were not wrapped either: all or nothing.
    assert [id(layer) for layer in lora_layers(lm)] == before


def test_unbuilt_model_is_refused():
    model = keras.Sequential([keras.layers.Dense(4, name="d")])
    with pytest.raises(ValueError, match="not built"):
        inject_lora(model, targets="d")


def test_inject_after_compile_before_training_trains_lora():
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    inject_lora(model, rank=2, targets="hidden_1")
    x, y = np.ones((8, 784), "float32"), np.zeros((8, 10), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    assert np.any(to_numpy(model.layers[0].lora_b))


def test_inject_after_training_requires_recompile():
    model = mlp()
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((8, 784), "float32")
    y = np.zeros((8, 10), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    with pytest.warns(UserWarning, match="compile.*again"):
        inject_lora(model, rank=2, targets="hidden_1")
    with pytest.raises(ValueError, match="compile"):
        model.fit(x, y, epochs=1, verbose=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    b_before = to_numpy(model.layers[0].lora_b).copy()
    model.fit(x, y, epochs=1, verbose=0)
    assert not np.array_equal(to_numpy(model.layers[0].lora_b), b_before)


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


def test_inject_lora_walks_the_tree_once(monkeypatch):
    lm = tiny_gpt2_lm()
    walks = count_walks(monkeypatch)
    inject_lora(lm, rank=2, targets=("query", "value", "feedforward_.*_dense"))
    # Matching, checking, wrapping and freezing share one LayerIndex (it
    # took four walks before).
    assert walks == [lm.name]
    assert len(lora_layers(lm)) == 8
    assert {w.name for w in lm.trainable_weights} == {"lora_a", "lora_b"}
