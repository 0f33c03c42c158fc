"""LoRA over Keras-quantized frozen kernels (int8, int4, float8)."""

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_lora import (
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from keras_lora import quantized as quantized_module
from keras_lora.families import GPT2, quantized_dtype
from keras_lora.quantized import (
    dequantized_kernel,
    initialize_quantized,
    install_straight_through_gradients,
    quantization_mode,
    quantized_dtype_policy,
)
from tests.helpers import (
    constant_token_task,
    learnable_lm,
    mlp,
    randomize_lora_b,
    tiny_gpt2_backbone,
    to_numpy,
)

MODES = ("int8", "int4", "float8")
ORDERS = ("quantize_then_inject", "inject_then_quantize")
STEPS = 30


def _lm(mode, order, targets=("query", "value")):
    keras.utils.set_random_seed(0)
    lm = learnable_lm()
    if mode and order == "quantize_then_inject":
        lm.quantize(mode)
    inject_lora(lm, targets=targets, seed=0)
    if mode and order == "inject_then_quantize":
        lm.quantize(mode)
    return lm


def _fit(model, x, y, w=None):
    """Loss before and after `STEPS` full-batch Adam steps."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    # One batch per epoch: epoch i reports the loss before its update, so
    # epoch STEPS + 1 gives the loss after STEPS updates (no extra trace).
    history = model.fit(
        x, y, sample_weight=w, epochs=STEPS + 1, batch_size=len(y), verbose=0
    )
    losses = history.history["loss"]
    return float(losses[0]), float(losses[STEPS])


def _frozen_values(model):
    lora_ids = {id(v) for layer in lora_layers(model) for v in layer.weights}
    return {
        v.path + f"#{i}": to_numpy(v.value).copy()
        for i, v in enumerate(model.weights)
        if id(v) not in lora_ids and not v.trainable
    }


_float_loss = {}


def _float_lm_loss():
    if "lm" not in _float_loss:
        x, y, w = constant_token_task()
        _float_loss["lm"] = _fit(_lm(None, None), x, y, w)
    return _float_loss["lm"]


@pytest.mark.parametrize(
    "mode, order",
    [(m, o) for m in ("int8", "int4") for o in ORDERS]
    # float8 keeps a float kernel; one order shows its call path trains.
    + [("float8", "quantize_then_inject")],
)
def test_gpt2_over_quantized_base_trains_like_float(mode, order):
    float_before, float_after = _float_lm_loss()
    lm = _lm(mode, order)
    x, y, w = constant_token_task()
    quantized = [layer.original_layer for layer in lora_layers(lm)]
    assert all(layer.quantization_mode == mode for layer in quantized)
    frozen = _frozen_values(lm)
    before, after = _fit(lm, x, y, w)
    # As good as over the float base (int4 here ends lower, not higher).
    assert before - after >= 0.98 * (float_before - float_after), (before, after)
    assert after <= float_after * 1.02, (mode, order, after, float_after)
    # The quantized kernels (and every other frozen weight) did not move.
    for key, value in _frozen_values(lm).items():
        np.testing.assert_array_equal(value, frozen[key], err_msg=key)
    for layer in lora_layers(lm):
        assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"
        assert layer.compute_dtype == "float32"
        assert np.abs(to_numpy(layer.lora_b.value)).max() > 0
        # No persistent float copy of the kernel: the kernel variable keeps
        # its quantized dtype (float8 stores the float kernel by design).
        kernel = next(v for v in layer.original_layer.weights if v.name == "kernel")
        assert kernel.dtype == ("float32" if mode == "float8" else "int8")
        float_like = [
            v
            for v in layer.original_layer.weights
            if tuple(v.shape) == tuple(layer.original_layer.kernel.shape)
            and v.dtype == "float32"
        ]
        assert float_like == ([kernel] if mode == "float8" else [])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_mlp_over_quantized_base_trains_like_float(mode, order):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 784)).astype("float32")
    y = rng.integers(0, 10, 32).astype("int32")
    results = {}
    for m in (None, mode):
        keras.utils.set_random_seed(0)
        model = mlp()
        if m and order == "quantize_then_inject":
            model.quantize(m)
        inject_lora(model, targets=("hidden_1", "hidden_2", "logits"), seed=0)
        if m and order == "inject_then_quantize":
            model.quantize(m)
        results[m] = _fit(model, x, y)
    (float_before, float_after), (before, after) = results[None], results[mode]
    # The task is memorised to a loss near 0, so compare how much each run
    # lowered the loss: the quantized base within 2% of the float one.
    assert before - after >= 0.98 * (float_before - float_after), results


@pytest.mark.parametrize("tie_weights", (True, False))
@pytest.mark.parametrize("vocab_block", (None, 6))
def test_int8_output_head_gets_straight_through_input_gradient(
    tie_weights, vocab_block, monkeypatch
):
    # Keras's int8 ReversibleEmbedding(reverse=True) has no input gradient
    # but the one through its per-token scale; LoRA over an int8 GPT-2 then
    # trained in the wrong direction. The gradient is computed a block of
    # vocabulary entries at a time (20 = 3 x 6 + 2 here).
    if vocab_block:
        monkeypatch.setattr(quantized_module, "_VOCAB_BLOCK", vocab_block)
    keras.utils.set_random_seed(0)
    layer = keras.layers.ReversibleEmbedding(20, 8, tie_weights=tie_weights)
    layer.build()
    layer.embeddings.assign(np.random.default_rng(0).normal(size=(20, 8)))
    if not tie_weights:
        layer.reverse_embeddings.assign(np.random.default_rng(3).normal(size=(8, 20)))
    x = np.random.default_rng(1).normal(size=(2, 3, 8)).astype("float32")
    weights = np.random.default_rng(2).normal(size=(2, 3, 20)).astype("float32")

    def input_gradient():
        return to_numpy(
            _gradient(
                lambda t: ops.sum(
                    ops.multiply(layer(t, reverse=True), ops.convert_to_tensor(weights))
                ),
                x,
            )
        )

    float_grad = input_gradient()
    layer.quantize("int8")
    assert install_straight_through_gradients(layer) == 1
    if tie_weights:
        table = to_numpy(layer._embeddings) / to_numpy(layer.embeddings_scale)[:, None]
    else:
        table = (
            to_numpy(layer.reverse_embeddings)
            / to_numpy(layer.reverse_embeddings_scale)[None, :]
        ).T
    np.testing.assert_allclose(input_gradient(), weights @ table, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(input_gradient(), float_grad, rtol=0.05, atol=0.05)


def _gradient(fn, x):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.grad(fn)(x)
    if backend == "tensorflow":
        import tensorflow as tf

        t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(t)
            value = fn(t)
        return tape.gradient(value, t)
    import torch

    t = torch.tensor(x, requires_grad=True)
    fn(t).backward()
    return t.grad


def _small_model(mode=None, update=True):
    """A GPT-2-like EinsumDense projection and a GELU Dense, LoRA on both."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 16))
    x = keras.layers.EinsumDense(
        "abc,cde->abde", (None, 2, 8), bias_axes="de", name="query"
    )(inputs)
    x = keras.layers.Reshape((4, 16))(x)
    outputs = keras.layers.Dense(32, activation="gelu", name="ffn")(x)
    model = keras.Model(inputs, outputs)
    for layer in model.layers[1:]:
        if layer.weights:
            layer.bias.assign(
                np.linspace(-0.5, 0.5, int(np.prod(layer.bias.shape))).reshape(
                    layer.bias.shape
                )
            )
    if mode:
        model.quantize(mode)
    inject_lora(model, targets=("query", "ffn"), seed=0)
    if update:
        randomize_lora_b(model, scale=0.5)
    return model


SMALL_X = np.random.default_rng(5).normal(size=(3, 4, 16)).astype("float32")


@pytest.mark.parametrize("mode", MODES)
def test_merge_to_float_adds_the_update_to_the_dequantized_kernel(mode):
    lm = _small_model(mode)
    x = SMALL_X
    unmerged = to_numpy(lm(x))
    expected = {
        layer.original_layer.path: to_numpy(dequantized_kernel(layer.original_layer))
        + to_numpy(layer.delta())
        for layer in lora_layers(lm)
    }
    merge_lora(lm, quantized="float")
    assert lora_layers(lm) == []
    for name in ("query", "ffn"):
        merged = lm.get_layer(name)
        assert merged.quantization_mode is None and merged.kernel.dtype == "float32"
        assert merged.kernel.path == f"{name}/kernel" and not merged.trainable
        np.testing.assert_array_equal(
            to_numpy(merged.kernel.value), expected[merged.path]
        )
    merged = to_numpy(lm(x))
    if mode == "int4":
        # Weight-only: the int4 call is exactly x @ dequantized kernel.
        np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-4)
    else:
        # int8 and float8 also round the inputs; the float layer does not.
        assert np.abs(merged - unmerged).mean() < 0.05 * np.abs(unmerged).mean()


@pytest.mark.parametrize("mode", MODES)
def test_merge_requantize_keeps_mode_and_the_update(mode):
    lm = _small_model(mode)
    x = SMALL_X
    unmerged = to_numpy(lm(x))
    base = to_numpy(_small_model(mode, update=False)(x))
    merge_lora(lm, quantized="requantize")
    assert lora_layers(lm) == []
    for name in ("query", "ffn"):
        assert lm.get_layer(name).quantization_mode == mode
    merged = to_numpy(lm(x))
    error = np.abs(merged - unmerged).mean()
    # Rounding adds some error, far less than dropping the update would.
    assert error < 0.2 * np.abs(base - unmerged).mean()


def test_merge_quantized_needs_a_choice_and_leaves_model_unchanged():
    lm = _small_model("int8")
    x = SMALL_X
    out = to_numpy(lm(x))
    for bad in (None, "int8", "dequantize"):
        with pytest.raises(ValueError, match=r"requantize.*float|quantized=") as info:
            merge_lora(lm, quantized=bad)
        assert repr(bad) in str(info.value)
        assert len(lora_layers(lm)) == 2
    np.testing.assert_array_equal(to_numpy(lm(x)), out)


def _gptq_dense():
    dense = keras.layers.Dense(4, name="dense")
    dense.build((None, 8))
    config = keras.quantizers.GPTQConfig(dataset=["a"], tokenizer=lambda t: t)
    dense.quantize("gptq", config=config)
    return dense


@pytest.mark.parametrize("mode", ("gptq", "awq"))
def test_gptq_and_awq_layers_are_refused(mode):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
    config_cls = (
        keras.quantizers.GPTQConfig if mode == "gptq" else keras.quantizers.AWQConfig
    )
    model.layers[0].quantize(
        mode, config=config_cls(dataset=["a"], tokenizer=lambda t: t)
    )
    before = [v.path for v in model.weights]
    with pytest.raises(ValueError, match=f"mode '{mode}'"):
        inject_lora(model, targets="dense")
    assert lora_layers(model) == [] and [v.path for v in model.weights] == before


def test_quantizing_to_gptq_after_inject_is_refused_at_call_and_merge():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
    inject_lora(model, targets="dense")
    config = keras.quantizers.GPTQConfig(dataset=["a"], tokenizer=lambda t: t)
    lora_layers(model)[0].original_layer.quantize("gptq", config=config)
    with pytest.raises(ValueError, match="mode 'gptq'"):
        model(np.zeros((1, 8), "float32"))
    with pytest.raises(ValueError, match="mode 'gptq'"):
        merge_lora(model, quantized="float")
    assert len(lora_layers(model)) == 1


@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_dequantized_kernel_is_what_the_layer_multiplies_by(mode):
    model = _small_model(mode, update=False)
    for lora, equation in zip(
        lora_layers(model), ("abc,cde->abde", "...a,ab->...b"), strict=True
    ):
        layer = lora.original_layer  # Its activation moved to the wrapper.
        kernel = to_numpy(dequantized_kernel(layer))
        assert kernel.shape == tuple(layer.kernel.shape)
        x = SMALL_X
        expected = np.einsum(equation, x, kernel) + to_numpy(layer.bias.value)
        # int4 is weight-only (exact); int8 also rounds the inputs.
        tolerance = 1e-5 if mode == "int4" else 0.02
        np.testing.assert_allclose(
            to_numpy(layer(x)), expected, rtol=tolerance, atol=tolerance
        )


@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_adapter_over_quantized_base_round_trips(mode, tmp_path):
    lm = _lm(mode, "quantize_then_inject")
    randomize_lora_b(lm, scale=0.5)
    x, _, _ = constant_token_task()
    out = to_numpy(lm(x))
    factors = {
        layer.lora_a.path: to_numpy(layer.lora_a.value) for layer in lora_layers(lm)
    } | {layer.lora_b.path: to_numpy(layer.lora_b.value) for layer in lora_layers(lm)}
    save_adapter(lm, tmp_path / "adapter")

    def check_factors(model):
        for layer in lora_layers(model):
            for v in (layer.lora_a, layer.lora_b):
                np.testing.assert_array_equal(to_numpy(v.value), factors[v.path])

    # Into the same quantized base: same factors, same outputs.
    same = learnable_lm_quantized(mode)
    load_adapter(same, tmp_path / "adapter")
    check_factors(same)
    np.testing.assert_array_equal(to_numpy(same(x)), out)
    # Into the float base: the same factors.
    keras.utils.set_random_seed(0)
    float_lm = learnable_lm()
    load_adapter(float_lm, tmp_path / "adapter")
    check_factors(float_lm)


def learnable_lm_quantized(mode):
    keras.utils.set_random_seed(0)
    lm = learnable_lm()
    lm.quantize(mode)
    return lm


def _variables(model):
    return {
        v.path: (str(v.dtype), tuple(v.shape))
        for layer in model._flatten_layers(include_self=True)
        if quantization_mode(layer) and not layer._layers
        for v in layer.weights
    }


@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_built_quantized_equals_quantize_after_build(mode):
    """`quantized_dtype(GPT2, mode)` builds the layers `model.quantize`
    quantizes, with the same variables; loaded with the same values, the
    two models give the same logits and the same LoRA training step."""
    keras.utils.set_random_seed(0)
    # Dropout 0: each model's dropout layers draw their own masks.
    after = learnable_lm(dropout=0.0)
    after.quantize(mode)
    built = keras_hub.models.GPT2CausalLM(
        backbone=tiny_gpt2_backbone(dropout=0.0, dtype=quantized_dtype(GPT2, mode)),
        preprocessor=None,
    )
    assert _variables(built.backbone) == _variables(after.backbone)
    assert len(_variables(built.backbone)) > 0
    # No float kernel was ever made for a quantized layer of `built`.
    for layer in built.backbone._flatten_layers():
        if quantization_mode(layer) and not layer._layers:
            kernel = next(
                v for v in layer.weights if v.name in ("kernel", "embeddings")
            )
            assert kernel.dtype == "int8"
    # 6 projections x 2 blocks + the token embedding.
    assert initialize_quantized(built.backbone) == 13
    values = {v.path: v for v in after.weights}
    for v in built.weights:
        v.assign(to_numpy(values[v.path].value))
    x, y, w = constant_token_task()
    np.testing.assert_array_equal(
        to_numpy(built.predict_on_batch(x)), to_numpy(after.predict_on_batch(x))
    )
    for model in (built, after):
        inject_lora(model, targets=("query", "value"), seed=0)
    steps = [_fit_steps(model, x, y, w) for model in (built, after)]
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-5)


def _fit_steps(model, x, y, w, steps=3):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, sample_weight=w, epochs=steps, batch_size=8, verbose=0)
    return history.history["loss"]


@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_initialize_quantized_draws_what_quantize_would_give(mode):
    """A layer built quantized and filled by `initialize_quantized` holds
    exactly what Keras's `quantize` makes of a float layer with the same
    (seeded) initializer."""
    init = keras.initializers.GlorotUniform(seed=3)
    config = dict(units=256, kernel_initializer=init, bias_initializer="ones")
    float_layer = keras.layers.Dense(**config, name="dense_q")
    float_layer.build((None, 256))
    float_layer.quantize(mode)
    policy = quantized_dtype_policy(mode, ["dense_q"])
    layer = keras.layers.Dense(**config, name="dense_q", dtype=policy)
    layer.build((None, 256))
    kernel = next(v for v in layer.weights if v.name == "kernel")
    assert not np.any(to_numpy(kernel.value))  # Keras builds zeros.
    assert initialize_quantized(layer) == 1
    expected = {v.name: to_numpy(v.value) for v in float_layer.weights}
    assert sorted(expected) == sorted(v.name for v in layer.weights)
    for v in layer.weights:
        np.testing.assert_array_equal(to_numpy(v.value), expected[v.name], v.name)


def test_quantized_build_refuses_other_modes():
    for mode in ("float8", "gptq", "int2"):
        with pytest.raises(ValueError, match=mode):
            quantized_dtype_policy(mode, ["dense"])
    with pytest.raises(ValueError, match="layer path"):
        quantized_dtype_policy("int8", [])
