"""DoRA (`use_dora=True`): the math, training, merge, files and refusals.

PEFT comparisons (GPT-2 with its fused c_attn, and Llama) are at the end;
they need torch, transformers and peft for the reference only.
"""

import json
import os

import keras
import numpy as np
import pytest

from keras_lora import (
    LoraLayer,
    adapter_batch,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    set_adapter,
)
from tests.helpers import dtype_policy, snapshot, to_numpy

RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 5, 8)).astype("float32")


def small_model(name="m") -> keras.Model:
    """An EinsumDense with a head axis (output features (2, 3), biased on
    both) and a Dense with an activation, as keras-hub projections are."""
    inputs = keras.Input((5, 8))
    x = keras.layers.EinsumDense("abc,cde->abde", (5, 2, 3), bias_axes="de", name="q")(
        inputs
    )
    x = keras.layers.Reshape((5, 6))(x)
    outputs = keras.layers.Dense(4, activation="gelu", name="d")(x)
    model = keras.Model(inputs, outputs, name=name)
    for weight in model.weights:  # Biases away from zero too.
        weight.assign(RNG.normal(0, 0.5, weight.shape).astype("float32"))
    return model


def perturb(model, seed=1) -> None:
    """Non-zero B's and magnitudes away from the norms, as after training."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        for adapter in (layer.adapters[n] for n in layer.adapters.names):
            shape = tuple(adapter.lora_b.shape)
            adapter.lora_b.assign(rng.normal(0, 0.5, shape).astype("float32"))
            if adapter.magnitude is not None:
                m = to_numpy(adapter.magnitude.value)
                adapter.magnitude.assign(m * rng.uniform(0.5, 1.5, m.shape))


def reference(layer: LoraLayer, x: np.ndarray) -> np.ndarray:
    """DoRA's formula in NumPy, from the layer's kernel and factors:
    activation(m / ||W + s·A·B|| * (x·(W + s·A·B)) + bias)."""
    original = layer.original_layer
    kernel = to_numpy(original.kernel)
    delta = to_numpy(layer.delta())
    weight = kernel + delta
    equation = getattr(original, "equation", "...a,ab->...b")
    split = layer.split
    axes = tuple(split.kernel_spec.index(c) for c in split.in_axes)
    factor = to_numpy(layer.lora_magnitude.value) / np.sqrt(
        np.sum(np.square(weight), axis=axes)
    )
    out = np.einsum(equation, x, weight) * factor
    if original.bias is not None:
        out = out + to_numpy(original.bias)
    return to_numpy(layer.activation(out))


def test_magnitude_starts_at_column_norms_and_is_a_no_op():
    model = small_model()
    before = to_numpy(model(X))
    inject_lora(model, rank=2, targets=("q", "d"), use_dora=True)
    q, d = lora_layers(model)
    assert q.use_dora and d.use_dora
    assert [v.path for v in q.lora_variables()] == [
        "q/lora_a",
        "q/lora_b",
        "q/lora_magnitude",
    ]
    assert tuple(q.lora_magnitude.shape) == (2, 3)  # q's output features.
    assert tuple(d.lora_magnitude.shape) == (4,)
    assert keras.backend.standardize_dtype(q.lora_magnitude.dtype) == "float32"
    kernel = to_numpy(q.original_layer.kernel)  # (8, 2, 3): norm over axis 0.
    np.testing.assert_allclose(
        to_numpy(q.lora_magnitude.value), np.linalg.norm(kernel, axis=0), rtol=1e-6
    )
    np.testing.assert_array_equal(to_numpy(model(X)), before)
    # Trainable: both factors and the magnitude of each layer.
    assert len(model.trainable_weights) == 6


def test_output_is_dora_formula():
    model = small_model()
    inject_lora(model, rank=2, alpha=3.0, targets=("q", "d"), use_dora=True)
    perturb(model)
    q, d = lora_layers(model)
    hidden = reference(q, X)
    np.testing.assert_allclose(to_numpy(q(X)), hidden, atol=1e-5)
    hidden = hidden.reshape(3, 5, 6)
    np.testing.assert_allclose(to_numpy(d(hidden)), reference(d, hidden), atol=1e-5)


def test_dropout_follows_peft():
    # PEFT, training with dropout: base(x) + (f - 1)·(x'·W) + f·s·B(A(x')),
    # with one dropout mask x' for both terms. A rate this close to 1
    # drops almost everything: the result is then near base(x), far from
    # the DoRA output without dropout.
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(4, name="d")(inputs))
    inject_lora(model, rank=2, targets="d", dropout=0.999, seed=3, use_dora=True)
    perturb(model)
    (layer,) = lora_layers(model)
    x = RNG.normal(size=(64, 8)).astype("float32")
    base = to_numpy(layer.original_layer(x))
    dora = to_numpy(layer(x, training=False))
    trained = to_numpy(layer(x, training=True))
    assert np.abs(dora - base).max() > 0.1
    # Rows where the mask kept nothing equal the base output exactly.
    assert np.mean(np.all(np.isclose(trained, base, atol=1e-6), axis=1)) > 0.9


def test_training_changes_only_factors_and_magnitudes():
    model = small_model()
    inject_lora(model, rank=2, alpha=4.0, targets=("q", "d"), use_dora=True)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 5, 8)).astype("float32")
    # A target the base model misses: its own outputs, rescaled per feature.
    y = to_numpy(model(x)) * rng.uniform(0.5, 1.5, (4,)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    before = snapshot(model)
    losses = model.fit(x, y, epochs=8, batch_size=32, verbose=0).history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    after = snapshot(model)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {
        f"{layer}/{name}"
        for layer in ("q", "d")
        for name in ("lora_a", "lora_b", "lora_magnitude")
    }


def test_merge_equals_unmerged():
    model = small_model()
    inject_lora(model, rank=2, alpha=3.0, targets=("q", "d"), use_dora=True)
    perturb(model)
    unmerged = to_numpy(model(X))
    merge_lora(model)
    assert lora_layers(model) == []
    np.testing.assert_allclose(to_numpy(model(X)), unmerged, atol=1e-5)


def test_named_dora_adapter_beside_plain_one():
    # PEFT's semantics: each active adapter adds its own term to the base
    # output; a DoRA adapter rescales the base, not the other adapters.
    model = small_model()
    inject_lora(model, rank=2, alpha=2.0, targets=("q", "d"))
    inject_lora(
        model, rank=3, alpha=2.0, targets=("q", "d"), adapter_name="b", use_dora=True
    )
    perturb(model)
    base = to_numpy(model.get_layer("q").original_layer(X))
    q = lora_layers(model)[0]
    plain = to_numpy(q.lora_update(X, adapter=q.adapters["default"]))
    set_adapter(model, "b")
    only_b = to_numpy(q(X))
    set_adapter(model, ["default", "b"])
    np.testing.assert_allclose(to_numpy(q(X)), only_b + plain, atol=1e-5)
    assert np.abs(only_b - base).max() > 0.1
    both = to_numpy(model(X))
    merge_lora(model)
    np.testing.assert_allclose(to_numpy(model(X)), both, atol=1e-5)


def test_save_and_load_adapter_round_trip(tmp_path):
    model = small_model("m")
    inject_lora(model, rank=2, alpha=3.0, targets=("q", "d"), use_dora=True)
    perturb(model)
    expected = to_numpy(model(X))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert all(entry["use_dora"] for entry in config["layers"])
    other = small_model("m")
    base = {w.path: w for w in other.weights}
    for weight in model.weights:
        if "lora" not in weight.path:
            base[weight.path].assign(weight.value)
    load_adapter(other, tmp_path / "a")
    assert all(layer.use_dora for layer in lora_layers(other))
    np.testing.assert_array_equal(to_numpy(other(X)), expected)
    # Into the same layout: the magnitudes are replaced too.
    perturb(other, seed=5)
    load_adapter(other, tmp_path / "a")
    np.testing.assert_array_equal(to_numpy(other(X)), expected)


def test_keras_model_save_round_trip(tmp_path):
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, name="d")], name="s"
    )
    inject_lora(model, rank=2, targets="d", use_dora=True)
    perturb(model)
    x = X[0]
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert all(layer.use_dora for layer in lora_layers(loaded))
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


@pytest.mark.parametrize("policy", ("mixed_bfloat16", "mixed_float16"))
def test_mixed_precision_norm_in_float32(policy):
    from keras_lora import dora
    from keras_lora._keras_internals import autocast_scope

    with dtype_policy(policy):
        model = small_model()
    base = to_numpy(model(X))
    inject_lora(model, rank=2, targets=("q", "d"), use_dora=True)
    q = lora_layers(model)[0]
    assert keras.backend.standardize_dtype(q.lora_magnitude.dtype) == "float32"
    np.testing.assert_array_equal(to_numpy(model(X)), base)  # Still a no-op.
    perturb(model)
    kernel = to_numpy(q.original_layer.kernel) + to_numpy(q.delta())
    expected = to_numpy(q.lora_magnitude.value) / np.linalg.norm(kernel, axis=0)
    # Inside the layer's call, Keras would cast float32 variables read by
    # ops to the compute dtype; the factor is read in float32 all the same.
    with autocast_scope(policy.removeprefix("mixed_")):
        factor = to_numpy(dora.factor(q, q.adapters.first))
    assert factor.dtype == np.float32
    np.testing.assert_allclose(factor, expected, rtol=1e-6)
    output = to_numpy(q(X)).astype("float32")
    np.testing.assert_allclose(output, reference(q, X), rtol=0.02, atol=0.05)


# --- refusals ----------------------------------------------------------------


def _unchanged(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)


def test_refuses_quantized_base():
    model = small_model()
    model.quantize("int8")
    before = snapshot(model)
    with pytest.raises(ValueError, match="quantized"):
        inject_lora(model, rank=2, targets=("q", "d"), use_dora=True)
    assert lora_layers(model) == []
    _unchanged(model, before)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_refuses_kernel_rewriting_init(init):
    model = small_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="DoRA with init="):
        inject_lora(model, rank=2, targets=("q", "d"), use_dora=True, init=init)
    assert lora_layers(model) == []
    _unchanged(model, before)
    with pytest.raises(ValueError, match="DoRA with init="):
        LoraLayer(model.get_layer("d"), rank=2, use_dora=True, init=init)
    _unchanged(model, before)


def test_refuses_to_run_over_a_base_quantized_later():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="d")])
    inject_lora(model, rank=2, targets="d", use_dora=True)
    model.quantize("int8")
    with pytest.raises(ValueError, match="merge_lora"):
        model(X[0])


def test_refuses_named_dora_adapter_over_quantized_base():
    model = small_model()
    model.quantize("int8")
    inject_lora(model, rank=2, targets=("q", "d"))
    before = snapshot(model)
    with pytest.raises(ValueError, match="quantized"):
        inject_lora(model, targets=("q", "d"), adapter_name="b", use_dora=True)
    assert [layer.adapters.names for layer in lora_layers(model)] == [
        ("default",),
        ("default",),
    ]
    _unchanged(model, before)


def test_adapter_batch_refuses_dora():
    model = small_model()
    inject_lora(model, rank=2, targets=("q", "d"))
    inject_lora(model, rank=2, targets=("q", "d"), adapter_name="b", use_dora=True)
    perturb(model)
    expected = to_numpy(model(X))
    with pytest.raises(ValueError, match="DoRA"):
        with adapter_batch(model, ["default", "b", None]):
            pass
    np.testing.assert_array_equal(to_numpy(model(X)), expected)


def test_load_refuses_damaged_magnitude(tmp_path):
    model = small_model("m")
    inject_lora(model, rank=2, targets=("q", "d"), use_dora=True)
    save_adapter(model, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["layers"][0]["use_dora"] = False  # Now the magnitude is extra.
    config_path.write_text(json.dumps(config))
    other = small_model("m")
    before = snapshot(other)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter(other, tmp_path / "a")
    assert lora_layers(other) == []
    _unchanged(other, before)


# --- PEFT (use_dora=True) ------------------------------------------------------
# torch, transformers and peft compute the reference only; the Keras side
# runs on KERAS_BACKEND.

PEFT_ATOL = 1e-4


def assert_peft_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PEFT_ATOL)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from tests import peft_helpers as ph

    return ph.save_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2_dora"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from tests.family_cases import CASES
    from tests.peft_helpers import Side, save_tiny_model

    case = next(c for c in CASES if c.family.name == "llama")
    return Side(case, save_tiny_model(case, tmp_path_factory.mktemp("llama_dora")))


def _perturb_peft_magnitudes(model, seed=0) -> None:
    """PEFT magnitudes away from the column norms, as after training."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                noise = torch.rand(param.shape, generator=generator)
                param.mul_(0.5 + noise)


def test_gpt2_export_q_v_to_peft(gpt2_dir, tmp_path):
    import peft
    import safetensors.numpy

    from keras_lora.interop import export_peft, import_peft
    from tests import peft_helpers as ph

    ids = ph.token_ids()
    lm = ph.keras_lm(gpt2_dir)
    base = ph.keras_outputs(lm, ids)
    inject_lora(lm, rank=2, alpha=4.0, targets=("query", "value"), use_dora=True)
    perturb(lm)
    expected = ph.keras_outputs(lm, ids)
    assert np.abs(expected - base).max() > 100 * PEFT_ATOL

    adapter = export_peft(lm, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = safetensors.numpy.load_file(
        os.path.join(adapter, "adapter_model.safetensors")
    )
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    assert tensors[key].shape == (48,)  # q|k|v of the fused c_attn.
    # Key has no adapter: its columns get their norms, an exact no-op.
    key_layer = lm.backbone.get_layer("transformer_layer_0")._self_attention_layer
    key_kernel = to_numpy(key_layer._key_dense.kernel).reshape(16, 16)
    np.testing.assert_allclose(
        tensors[key][16:32], np.linalg.norm(key_kernel, axis=0), rtol=1e-6
    )

    model = peft.PeftModel.from_pretrained(ph.hf_lm(gpt2_dir), adapter).eval()
    np.testing.assert_allclose(
        ph.torch_outputs(model, ids), expected, rtol=0, atol=PEFT_ATOL
    )
    # And back: every c_attn role is wrapped, key with a zero B and its norms.
    other = import_peft(ph.keras_lm(gpt2_dir), adapter)
    assert all(layer.use_dora for layer in lora_layers(other))
    np.testing.assert_allclose(
        ph.keras_outputs(other, ids), expected, rtol=0, atol=PEFT_ATOL
    )


def test_gpt2_import_from_peft(gpt2_dir, tmp_path):
    import peft
    import torch

    from keras_lora.interop import import_peft
    from tests import peft_helpers as ph

    ids = ph.token_ids()
    torch.manual_seed(0)
    model = peft.get_peft_model(
        ph.hf_lm(gpt2_dir),
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            use_dora=True,
            init_lora_weights=False,
        ),
    ).eval()
    # Key's magnitudes too differ from its norms: import must keep them.
    _perturb_peft_magnitudes(model)
    expected = ph.torch_outputs(model, ids)
    model.save_pretrained(tmp_path)

    lm = import_peft(ph.keras_lm(gpt2_dir), tmp_path)
    assert [layer.name for layer in lora_layers(lm)][:4] == [
        "query",
        "key",
        "value",
        "feedforward_intermediate_dense",
    ]
    assert all(layer.use_dora for layer in lora_layers(lm))
    np.testing.assert_allclose(
        ph.keras_outputs(lm, ids), expected, rtol=0, atol=PEFT_ATOL
    )
    # Merged, the same model.
    merge_lora(lm)
    np.testing.assert_allclose(
        ph.keras_outputs(lm, ids), expected, rtol=0, atol=PEFT_ATOL
    )


def test_llama_both_directions(llama, tmp_path):
    import peft
    import torch

    from keras_lora.interop import export_peft, import_peft

    side = llama
    m = side.module
    torch.manual_seed(1)
    model = peft.get_peft_model(
        side.hf_model(),
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=[m("query"), m("value"), m(side.family.roles[-1])],
            use_dora=True,
            init_lora_weights=False,
        ),
    ).eval()
    _perturb_peft_magnitudes(model)
    expected = side.hf_logits(model)
    assert np.abs(expected - side.hf_base).max() > 100 * PEFT_ATOL
    model.save_pretrained(tmp_path / "peft")
    lm = import_peft(side.keras_lm(), tmp_path / "peft")
    np.testing.assert_allclose(side.keras_logits(lm), expected, rtol=0, atol=PEFT_ATOL)

    # Keras -> PEFT, from Keras's own DoRA layers.
    lm = side.keras_lm()
    inject_lora(lm, rank=2, alpha=4.0, targets=("query", "value"), use_dora=True)
    perturb(lm)
    expected = side.keras_logits(lm)
    adapter = export_peft(lm, tmp_path / "keras")
    model = peft.PeftModel.from_pretrained(side.hf_model(), adapter).eval()
    np.testing.assert_allclose(side.hf_logits(model), expected, rtol=0, atol=PEFT_ATOL)


def test_peft_refusals(gpt2_dir, tmp_path):
    from keras_lora.interop import export_peft, import_peft
    from tests import peft_helpers as ph

    # Some layers DoRA, some plain: PEFT has one `use_dora`.
    lm = ph.keras_lm(gpt2_dir)
    inject_lora(lm, rank=2, targets="query", use_dora=True)
    inject_lora(lm, rank=2, targets="value", adapter_name="default")
    with pytest.raises(ValueError, match="use_dora"):
        export_peft(lm, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()

    # A DoRA adapter without its magnitudes is incomplete.
    lm = ph.keras_lm(gpt2_dir)
    inject_lora(lm, rank=2, targets=("query", "value"), use_dora=True)
    adapter = export_peft(lm, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = False
    config_path.write_text(json.dumps(config))
    fresh = ph.keras_lm(gpt2_dir)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        import_peft(fresh, adapter)
    assert lora_layers(fresh) == []
    _unchanged(fresh, before)
