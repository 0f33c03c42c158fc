"""surgery: walking the layer tree, the layer index, and swapping layers
so every reference Keras keeps follows (attributes, tracked lists, graph
nodes, the torch module registry, traced steps)."""

import keras
import numpy as np
import pytest

from keras_lora import LoraLayer, inject_lora, lora_layers, merge_lora
from keras_lora.surgery import (
    LayerIndex,
    drop_compiled_functions,
    replace_layers,
    walk_layers,
)
from tests.helpers import (
    functional_mlp,
    mlp,
    randomize_lora_b,
    tiny_gpt2_lm,
    to_numpy,
)


def test_walk_layers_paths_and_lora_insides():
    lm = tiny_gpt2_lm(num_layers=1)
    paths = [path for path, _ in walk_layers(lm)]
    assert len(paths) == len(set(paths))
    assert "gpt2_backbone/transformer_layer_0/self_attention/query" in paths
    inject_lora(lm, rank=1)
    after = dict(walk_layers(lm))
    # A LoraLayer is visited, its inside (the wrapped layer) is not.
    assert isinstance(
        after["gpt2_backbone/transformer_layer_0/self_attention/query"], LoraLayer
    )
    assert not any(
        p.startswith("gpt2_backbone/transformer_layer_0/self_attention/query/")
        for p in after
    )
    assert list(after) == paths


def test_walk_layers_yields_a_shared_layer_once():
    shared = keras.layers.Dense(4, name="shared")
    inputs = keras.Input((4,))
    outputs = shared(shared(inputs))
    model = keras.Model(inputs, outputs)
    assert [path for path, _ in walk_layers(model)] == ["input_layer", "shared"]


class Pair(keras.layers.Layer):
    """A container whose two children are plain attributes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.left = keras.layers.Dense(3, name="left")
        self.right = keras.layers.Dense(3, name="right")

    def build(self, input_shape):
        self.left.build(input_shape)
        self.right.build(input_shape)

    def call(self, x):
        return self.left(x) + self.right(x)


def test_layer_index_swap_equals_a_fresh_walk():
    model = keras.Sequential([keras.Input((3,)), Pair(name="pair"), Pair(name="p2")])
    index = LayerIndex(model)
    assert index.paths() == [
        "input_layer",
        "pair",
        "pair/left",
        "pair/right",
        "p2",
        "p2/left",
        "p2/right",
    ]
    pair, left = index["pair"], index["p2/left"]
    # Wrapping hides the wrapped layer; replacing a container brings in
    # what is below the new one and drops what was below the old one.
    new_pair = Pair(name="pair")
    new_pair.build((None, 3))
    index.swap({id(pair): new_pair, id(left): LoraLayer(left, rank=1)})
    fresh = dict(walk_layers(model))
    assert index.paths() == list(fresh)
    assert all(index[p] is layer for p, layer in fresh.items())
    assert index["pair/left"] is new_pair.left
    assert isinstance(index["p2/left"], LoraLayer)
    assert model.layers[0] is new_pair
    assert index.lora_layers() == [index["p2/left"]]


def test_layer_index_refuses_another_model():
    index = LayerIndex(mlp())
    with pytest.raises(ValueError, match="built for 'mlp'.*LayerIndex\\(model\\)"):
        lora_layers(functional_mlp(), index=index)


def test_replace_layers_in_a_sequential_keeps_the_graph():
    model = mlp()
    x = np.ones((2, 784), "float32")
    before = to_numpy(model(x))
    hidden = model.get_layer("hidden_2")
    replacement = keras.layers.Dense(256, activation="relu", name="hidden_2")
    replacement.build((None, 128))
    replacement.set_weights(hidden.get_weights())
    replace_layers(model, {id(hidden): replacement})
    assert model.get_layer("hidden_2") is replacement
    assert all(w is not hidden.kernel for w in model.weights)
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    clone = keras.Sequential.from_config(model.get_config())
    assert [layer.name for layer in clone.layers] == ["hidden_1", "hidden_2", "logits"]


def test_drop_compiled_functions():
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    model.predict(np.ones((2, 784), "float32"), verbose=0)
    assert model.predict_function is not None
    drop_compiled_functions(model)
    assert model.predict_function is None
    drop_compiled_functions(keras.layers.Dense(2))  # No traced steps: no-op.


def test_gpt2_causal_lm_surgery_updates_every_reference():
    lm = tiny_gpt2_lm()
    attention = lm.backbone.get_layer("transformer_layer_0")._self_attention_layer
    original_query = attention._query_dense
    inject_lora(lm, rank=2)
    wrapped = lora_layers(lm)
    assert [layer.name for layer in wrapped] == ["query", "value"] * 2
    assert isinstance(attention._query_dense, LoraLayer)
    assert attention._query_dense.original_layer is original_query
    assert original_query not in attention._layers
    assert attention._query_dense in attention._layers
    # Every weight appears once, LoRA factors included.
    paths = [w.path for w in lm.weights]
    assert len(paths) == len(set(paths))
    assert "transformer_layer_0/self_attention/query/lora_a" in paths
    if keras.backend.backend() == "torch":
        torch_params = dict(lm.named_parameters())
        assert sum(p.requires_grad for p in torch_params.values()) == 8
        assert any(name.endswith("query/lora_a") for name in torch_params)


def test_functional_model():
    model = functional_mlp()
    x = np.random.default_rng(0).normal(size=(3, 12)).astype("float32")
    before = to_numpy(model(x))
    inject_lora(model, rank=2, targets=("up", "down"))
    assert [type(layer).__name__ for layer in model.layers] == [
        "InputLayer",
        "LoraLayer",
        "LoraLayer",
        "Add",
    ]
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    # The graph calls the wrappers: a non-zero B changes the output.
    lora_layers(model)[1].lora_b.assign(np.ones((2, 12), "float32"))
    assert not np.allclose(to_numpy(model(x)), before)


def test_functional_model_with_wrapped_output_layer_saves(tmp_path):
    # The model's outputs name the layer that made them: the swap must
    # rewrite that too, or `save` cannot find the output node.
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    inject_lora(model, rank=2, targets=("head",))
    randomize_lora_b(model)
    x = np.random.default_rng(1).normal(size=(2, 6)).astype("float32")
    model.save(tmp_path / "wrapped.keras")
    restored = keras.saving.load_model(tmp_path / "wrapped.keras")
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(model(x)))
    assert [layer.name for layer in lora_layers(restored)] == ["head"]
    # And back: the merged model's output is a plain Dense again.
    expected = to_numpy(model(x))
    merge_lora(model)
    model.save(tmp_path / "merged.keras")
    merged = keras.saving.load_model(tmp_path / "merged.keras")
    assert type(merged.get_layer("head")) is keras.layers.Dense
    np.testing.assert_allclose(to_numpy(merged(x)), expected, rtol=1e-5, atol=1e-6)


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(8, activation="relu", name="encoder")
        self.blocks = [keras.layers.Dense(8, name=f"block_{i}") for i in range(2)]
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        x = self.encoder(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_subclassed_model_with_layer_list():
    model = Subclassed()
    x = np.ones((2, 5), "float32")
    model(x)
    inject_lora(model, rank=2, targets=("block_.*", "head"))
    assert isinstance(model.blocks[0], LoraLayer)
    assert isinstance(model.head, LoraLayer)
    assert [layer.name for layer in lora_layers(model)] == [
        "block_0",
        "block_1",
        "head",
    ]
    model.blocks[1].lora_b.assign(np.ones((2, 8), "float32"))
    model.head.lora_b.assign(np.ones((2, 3), "float32"))
    outputs = to_numpy(model(x))
    inner = to_numpy(model.encoder(x))
    for block in model.blocks:
        inner = inner + to_numpy(block(inner))
    np.testing.assert_allclose(outputs, to_numpy(model.head(inner)), rtol=1e-6)


def test_inject_after_predict_drops_the_traced_step():
    model = mlp()
    x = np.random.default_rng(0).normal(size=(4, 784)).astype("float32")
    model.predict(x, verbose=0)  # traces a predict step without LoRA
    inject_lora(model, rank=2, targets=("hidden_1",))
    randomize_lora_b(model, scale=0.5)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), to_numpy(model(x)), atol=1e-5, rtol=0
    )
