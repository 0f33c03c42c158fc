"""LoraLayer: factor shapes, the forward pass, dtypes, config, whole-model
saving and errors."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lora import LoraLayer, inject_lora, lora_layers, trainable_summary
from keras_lora.kernel_split import split_kernel
from tests.helpers import (
    dtype_policy,
    mlp,
    randomize_lora_b,
    snapshot,
    to_numpy,
)

# (equation, output shape without batch, input shape, A shape, B shape)
EINSUM_CASES = {
    "gpt2_query": ("abc,cde->abde", (None, 12, 4), (2, 5, 24), (24, 3), (3, 12, 4)),
    "gpt2_attention_output": (
        "abcd,cde->abe",
        (None, 24),
        (2, 5, 6, 4),
        (6, 4, 3),
        (3, 24),
    ),
    "gemma_query": ("btd,ndh->btnh", (None, 6, 4), (2, 5, 24), (24, 3), (3, 6, 4)),
    "ellipsis": ("...b,bc->...c", (7,), (2, 3, 5), (5, 3), (3, 7)),
    "output_axes_reordered": ("abc,cd->adb", (9, None), (2, 5, 6), (6, 3), (3, 9)),
}


def built_einsum(equation, output_shape, input_shape, activation=None):
    kernel_spec, output_spec = equation.split(",")[1].split("->")
    bias_axis = [c for c in output_spec if c in kernel_spec][-1]
    layer = keras.layers.EinsumDense(
        equation,
        output_shape,
        bias_axes=bias_axis,
        activation=activation,
        name="proj",
    )
    layer.build(input_shape)
    size = int(np.prod(layer.bias.shape))
    bias = np.linspace(-1, 1, size).astype("float32").reshape(layer.bias.shape)
    layer.bias.assign(bias)
    return layer


def reference_output(layer: LoraLayer, x):
    """original's pre-activation + x · (scale * A·B), computed as one einsum."""
    original = layer.original_layer
    kernel = to_numpy(original.kernel) + to_numpy(layer.delta())
    if isinstance(original, keras.layers.EinsumDense):
        y = np.einsum(original.equation, x, kernel)
    else:
        y = x @ kernel
    if original.bias is not None:
        y = y + to_numpy(original.bias)
    return to_numpy(layer.activation(ops.convert_to_tensor(y)))


@pytest.mark.parametrize("case", EINSUM_CASES, ids=list(EINSUM_CASES))
def test_einsum_factor_shapes_and_output(case):
    equation, output_shape, input_shape, a_shape, b_shape = EINSUM_CASES[case]
    layer = LoraLayer(built_einsum(equation, output_shape, input_shape), rank=3)
    assert tuple(layer.lora_a.shape) == a_shape
    assert tuple(layer.lora_b.shape) == b_shape
    layer.lora_b.assign(np.random.default_rng(0).normal(size=b_shape).astype("float32"))
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    np.testing.assert_allclose(
        to_numpy(layer(x)), reference_output(layer, x), rtol=1e-5, atol=1e-5
    )


def test_gpt2_base_query_factor_shapes():
    layer = keras.layers.EinsumDense("abc,cde->abde", (None, 12, 64), name="query")
    layer.build((None, None, 768))
    lora = LoraLayer(layer, rank=4)
    assert tuple(lora.lora_a.shape) == (768, 4)
    assert tuple(lora.lora_b.shape) == (4, 12, 64)
    assert split_kernel(layer).fan_out == 768


def test_fresh_adapter_is_exact_noop():
    layer = built_einsum("abc,cde->abde", (None, 4, 3), (2, 5, 8), activation="gelu")
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    before = to_numpy(layer(x))
    lora = LoraLayer(layer, rank=2, alpha=16.0)
    np.testing.assert_array_equal(to_numpy(lora(x)), before)


def test_update_goes_in_before_activation():
    dense = keras.layers.Dense(6, activation="gelu", name="ffn")
    dense.build((None, 5))
    lora = LoraLayer(dense, rank=2, alpha=4.0)
    lora.lora_b.assign(np.full((2, 6), 0.5, "float32"))
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    kernel = to_numpy(dense.kernel) + to_numpy(lora.delta())
    pre_activation = x @ kernel + to_numpy(dense.bias)
    expected = to_numpy(keras.activations.gelu(pre_activation))
    np.testing.assert_allclose(to_numpy(lora(x)), expected, rtol=1e-5, atol=1e-6)
    # The wrapped layer computes its linear part only while wrapped.
    np.testing.assert_allclose(
        to_numpy(dense(x)),
        x @ to_numpy(dense.kernel) + to_numpy(dense.bias),
        rtol=1e-5,
        atol=1e-6,
    )


def test_scale_initialisation_and_trainability():
    dense = keras.layers.Dense(32, name="d")
    dense.build((None, 300))
    lora = LoraLayer(dense, rank=8, alpha=32.0)
    assert lora.scale == 4.0
    assert LoraLayer(_built_dense(), rank=4, alpha=8.0, use_rslora=True).scale == 4.0
    a = to_numpy(lora.lora_a)
    bound = 1 / np.sqrt(300)
    assert np.all(np.abs(a) <= bound) and a.std() > bound / 3
    assert not np.any(to_numpy(lora.lora_b))
    assert lora.name == "d"
    assert [w.name for w in lora.trainable_weights] == ["lora_a", "lora_b"]
    assert {w.name for w in lora.non_trainable_weights} == {"kernel", "bias"}


def _built_dense(units=4, input_dim=6, name="dense_x", **kwargs):
    layer = keras.layers.Dense(units, name=name, **kwargs)
    layer.build((None, input_dim))
    return layer


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_factors_are_float32_under_mixed_policies(policy):
    with dtype_policy(policy):
        dense = _built_dense()
        lora = LoraLayer(dense)
        x = np.ones((2, 6), "float32")
        y = lora(x)
    assert lora.lora_a.dtype == "float32" and lora.lora_b.dtype == "float32"
    assert lora.compute_dtype == dense.compute_dtype != "float32"
    assert keras.backend.standardize_dtype(y.dtype) == dense.compute_dtype


def test_config_round_trip_keeps_activation_and_factors_shape():
    dense = _built_dense(activation="relu")
    lora = LoraLayer(dense, rank=3, alpha=6.0, dropout=0.1, seed=7)
    config = lora.get_config()
    assert config["original_layer"]["config"]["activation"] == "relu"
    clone = LoraLayer.from_config(config)
    assert (clone.rank, clone.alpha, clone.dropout, clone.name) == (
        3,
        6.0,
        0.1,
        "dense_x",
    )
    assert clone.activation is keras.activations.relu
    assert tuple(clone.lora_a.shape) == (6, 3)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(lora)
    )
    assert isinstance(restored, LoraLayer)


def test_dropout_only_in_training():
    lora = LoraLayer(_built_dense(), rank=2, dropout=0.5, seed=1)
    lora.lora_b.assign(np.ones((2, 4), "float32"))
    x = np.ones((64, 6), "float32")
    np.testing.assert_array_equal(to_numpy(lora(x)), to_numpy(lora(x)))
    assert not np.allclose(to_numpy(lora(x, training=True)), to_numpy(lora(x)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -2}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    dense = _built_dense()
    with pytest.raises(ValueError, match=message):
        LoraLayer(dense, **kwargs)
    assert dense.activation is keras.activations.linear and dense.trainable


def test_bad_layers():
    with pytest.raises(ValueError, match="not built"):
        LoraLayer(keras.layers.Dense(3))
    embedding = keras.layers.Embedding(10, 4, name="emb")
    embedding.build((None,))
    with pytest.raises(ValueError, match="Embedding.*only keras.layers.Dense"):
        LoraLayer(embedding)
    wrapped = LoraLayer(_built_dense())
    with pytest.raises(ValueError, match="already wrapped"):
        LoraLayer(wrapped)
    builtin = _built_dense(name="b")
    builtin.enable_lora(2)
    with pytest.raises(ValueError, match="built-in LoRA"):
        LoraLayer(builtin)
    # A kernel axis kept in the output (a per-head weight) is not a matrix.
    grouped = keras.layers.EinsumDense("abc,bc->abc", (3, 4), name="grouped")
    grouped.build((2, 3, 4))
    with pytest.raises(ValueError, match="kernel axis 'b'"):
        LoraLayer(grouped)


def test_whole_model_save_and_resume_sequential(tmp_path):
    model = mlp()
    inject_lora(model, rank=4, targets=("hidden_.*",))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 784)).astype("float32")
    y = rng.normal(size=(32, 10)).astype("float32")
    model.fit(x, y, epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(model(x)))
    assert [layer.name for layer in lora_layers(restored)] == ["hidden_1", "hidden_2"]
    assert trainable_summary(restored) == trainable_summary(model)
    before = snapshot(restored)
    restored.fit(x, y, epochs=2, verbose=0)
    for path, value in snapshot(restored).items():
        changed = not np.array_equal(value, before[path])
        assert changed == path.endswith(("lora_a", "lora_b")), path


def test_whole_model_save_functional(tmp_path):
    from tests.helpers import functional_mlp

    model = functional_mlp()
    inject_lora(model, rank=2, targets=("up", "down"))
    randomize_lora_b(model)
    model.save(tmp_path / "f.keras")
    restored = keras.saving.load_model(tmp_path / "f.keras")
    x = np.ones((2, 12), "float32")
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(model(x)))
    assert len(lora_layers(restored)) == 2
