"""`init=`: kaiming, gaussian, PiSSA (exact and randomised) and OLoRA.

PiSSA/OLoRA rewrite the frozen kernel into a residual; these tests check
that the model still computes the base at init, that the base comes back
whenever the adapter is off (disabled, deleted, left out of a merge), that
saved and exported adapters apply to the ORIGINAL base weights (against
real PEFT on torch), and that the factors equal PEFT's own initialisation.
"""

import math

import keras
import numpy as np
import pytest

from keras_lora import (
    LoraLayer,
    adapter_batch,
    delete_adapter,
    disable_lora,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    read_adapter_config,
    save_adapter,
    set_adapter,
)
from keras_lora.initialization import decompose
from tests.helpers import randomize_lora_b, snapshot, to_numpy

REWRITING = ("pissa", "pissa_niter_4", "olora")


def two_layer_model():
    """A Dense (with an activation) and an EinsumDense whose kernel puts an
    output axis first (Gemma's `btd,ndh->btnh`): the flattening must follow
    the equation, not the kernel's axis order."""
    inputs = keras.Input((3, 12))
    hidden = keras.layers.Dense(10, activation="gelu", name="dense")(inputs)
    outputs = keras.layers.EinsumDense("btd,ndh->btnh", (3, 2, 4), name="heads")(hidden)
    model = keras.Model(inputs, outputs, name="two")
    # Kernels with a spread-out spectrum, so the top directions are clear.
    rng = np.random.default_rng(0)
    for layer in model.layers[1:]:
        layer.kernel.assign(rng.normal(0, 0.3, layer.kernel.shape).astype("float32"))
    return model


def inputs(seed=1):
    return np.random.default_rng(seed).normal(0, 1, (4, 3, 12)).astype("float32")


def out(model, x):
    return to_numpy(model(x))


def test_unknown_init_is_refused_and_lists_the_known_ones():
    model = two_layer_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="Known: 'kaiming', 'gaussian', 'pissa'"):
        inject_lora(model, targets="dense", init="loftq")
    with pytest.raises(ValueError, match="Unknown `init`"):
        LoraLayer(model.get_layer("dense"), init="pissa_niter_x")
    assert lora_layers(model) == []
    assert snapshot(model).keys() == before.keys()


def test_kaiming_default_keeps_its_numbers():
    dense = keras.layers.Dense(6)
    dense.build((None, 20))
    layer = LoraLayer(dense, rank=3, seed=7)
    bound = 1.0 / math.sqrt(20)
    expected = keras.initializers.RandomUniform(-bound, bound, 7)((20, 3))
    np.testing.assert_array_equal(to_numpy(layer.lora_a), to_numpy(expected))
    assert layer.init == "kaiming"


def test_gaussian_statistics_shapes_and_no_op():
    model = two_layer_model()
    x = inputs()
    base = out(model, x)
    inject_lora(model, rank=8, targets=("dense", "heads"), init="gaussian", seed=3)
    dense, heads = lora_layers(model)
    assert tuple(heads.lora_a.shape) == (10, 8)
    assert tuple(heads.lora_b.shape) == (8, 2, 4)
    # PEFT: A ~ N(0, 1/r) as a standard deviation, B = 0.
    a = np.concatenate([to_numpy(dense.lora_a).ravel(), to_numpy(heads.lora_a).ravel()])
    assert abs(a.std() - 1 / 8) < 0.02 and abs(a.mean()) < 0.03
    assert not np.any(to_numpy(dense.lora_b)) and not np.any(to_numpy(heads.lora_b))
    np.testing.assert_array_equal(out(model, x), base)


@pytest.mark.parametrize("init", REWRITING)
def test_rewriting_init_keeps_the_model_and_stays_exact(init):
    model = two_layer_model()
    x = inputs()
    base = out(model, x)
    original = snapshot(model)
    inject_lora(model, rank=3, alpha=6.0, targets=("dense", "heads"), init=init)
    np.testing.assert_allclose(out(model, x), base, rtol=0, atol=1e-5)
    layer = model.get_layer("heads")
    # The factors hold the principal part: the kernel changed, B is not 0.
    assert (
        np.abs(
            to_numpy(layer.original_layer.kernel)
            - original[layer.original_layer.kernel.path]
        ).max()
        > 0.1
    )
    assert np.abs(to_numpy(layer.lora_b)).max() > 0.1
    # Trained: the base is back whenever the adapter is off.
    randomize_lora_b(model, scale=0.3)
    trained = out(model, x)
    assert np.abs(trained - base).max() > 0.1
    with disable_lora(model):
        np.testing.assert_allclose(out(model, x), base, rtol=0, atol=1e-5)
    with adapter_batch(model, [None, "default", None, "default"]):
        mixed = out(model, x)
    np.testing.assert_allclose(mixed[0::2], base[0::2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mixed[1::2], trained[1::2], rtol=0, atol=1e-5)
    merge_lora(model)
    np.testing.assert_allclose(out(model, x), trained, rtol=0, atol=1e-5)


def test_deleting_a_pissa_adapter_restores_the_original_kernels():
    model = two_layer_model()
    before = snapshot(model)
    inject_lora(model, rank=2, targets=("dense", "heads"), init="pissa")
    randomize_lora_b(model)
    delete_adapter(model, "default")
    after = snapshot(model)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_allclose(after[path], value, rtol=0, atol=1e-5)


def test_inactive_or_merged_out_pissa_adapter_gives_the_base():
    model = two_layer_model()
    x = inputs()
    base = out(model, x)
    inject_lora(model, rank=2, targets="dense", init="olora")
    inject_lora(model, rank=2, targets="heads", adapter_name="other")
    randomize_lora_b(model)
    set_adapter(model, "other")  # dense: its only adapter is inactive.
    with adapter_batch(model, ["other"] * 4):
        batched = out(model, x)
    only_other = out(model, x)
    np.testing.assert_allclose(batched, only_other, rtol=0, atol=1e-5)
    with disable_lora(model):
        np.testing.assert_allclose(out(model, x), base, rtol=0, atol=1e-5)
    merge_lora(model, adapter_names="other")
    np.testing.assert_allclose(out(model, x), only_other, rtol=0, atol=1e-5)
    # dense's kernel is the original again: only "other" changed the model.
    model_heads_off = two_layer_model()
    np.testing.assert_allclose(
        to_numpy(model.get_layer("dense").kernel),
        to_numpy(model_heads_off.get_layer("dense").kernel),
        rtol=0,
        atol=1e-5,
    )


def test_saved_pissa_adapter_applies_to_the_original_base(tmp_path):
    model = two_layer_model()
    inject_lora(model, rank=3, alpha=6.0, targets=("dense", "heads"), init="pissa")
    x = inputs()
    y = np.random.default_rng(2).normal(0, 1, (4, 3, 2, 4)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, batch_size=2, epochs=2, verbose=0)
    trained = out(model, x)
    save_adapter(model, tmp_path / "adapter")
    config = read_adapter_config(tmp_path / "adapter")
    # PEFT's conversion: rank 2r, alpha doubled (the scale stays 2).
    assert {(e["rank"], e["alpha"]) for e in config["layers"]} == {(6, 12.0)}
    fresh = two_layer_model()  # The ORIGINAL base weights.
    load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(out(fresh, x), trained, rtol=0, atol=1e-4)


def test_pissa_factors_match_an_svd_and_randomised_svd_is_close():
    rng = np.random.default_rng(0)
    # A clear spectral gap after the top 3 directions.
    u = np.linalg.qr(rng.normal(size=(30, 30)))[0]
    v = np.linalg.qr(rng.normal(size=(20, 20)))[0]
    s = np.array([10.0, 8.0, 6.0] + [0.1] * 17)
    kernel = (u[:, :20] * s) @ v.T
    a, b = decompose(kernel, "pissa", rank=3, scale=2.0)
    fast_a, fast_b = decompose(kernel, "pissa_niter_4", rank=3, scale=2.0, seed=0)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(s[:3] / 2.0))
    np.testing.assert_allclose(2.0 * fast_a @ fast_b, 2.0 * a @ b, atol=1e-6)
    residual = kernel - 2.0 * a @ b
    np.testing.assert_allclose(np.linalg.svd(residual)[1][0], 0.1, rtol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_equal_peft_on_the_same_kernel(init):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    module = torch.nn.Sequential()
    module.add_module("proj", torch.nn.Linear(12, 10, bias=False))
    weight = module.proj.weight.detach().numpy().copy()  # (out, in)
    config = peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["proj"], init_lora_weights=init
    )
    module = peft.inject_adapter_in_model(config, module)
    peft_a = module.proj.lora_A["default"].weight.detach().numpy()  # (r, in)
    peft_b = module.proj.lora_B["default"].weight.detach().numpy()  # (out, r)
    peft_residual = module.proj.base_layer.weight.detach().numpy()

    dense = keras.layers.Dense(10, use_bias=False)
    dense.build((None, 12))
    dense.kernel.assign(weight.T)
    layer = LoraLayer(dense, rank=3, alpha=6.0, init=init)
    a, b = to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    # The same factors up to each direction's sign (LAPACK's choice).
    signs = np.sign(np.sum(a * peft_a.T, axis=0))
    np.testing.assert_allclose(a * signs, peft_a.T, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b * signs[:, None], peft_b.T, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(dense.kernel), peft_residual.T, rtol=0, atol=1e-5
    )


def test_rewriting_init_refusals_leave_the_model_unchanged():
    model = two_layer_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="rank must be at most 8"):
        # heads: fan_in 10, fan_out 8; dense is checked first and fits.
        inject_lora(model, rank=9, targets=("dense", "heads"), init="pissa")
    assert lora_layers(model) == []
    for path, value in snapshot(model).items():
        np.testing.assert_array_equal(value, before[path])

    inject_lora(model, rank=2, targets="dense", init="pissa")
    kernels = snapshot(model)
    with pytest.raises(ValueError, match="only adapter on its layers"):
        inject_lora(model, rank=2, targets="dense", adapter_name="second")
    with pytest.raises(ValueError, match="only adapter on its layers"):
        inject_lora(model, rank=2, targets=("heads", "dense"), adapter_name="x")
    assert [layer.name for layer in lora_layers(model)] == ["dense"]
    assert model.get_layer("dense").adapters.names == ("default",)
    for path, value in snapshot(model).items():
        np.testing.assert_array_equal(value, kernels[path])


def test_pissa_beside_another_adapter_is_refused():
    model = two_layer_model()
    inject_lora(model, rank=2, targets="dense")
    before = snapshot(model)
    with pytest.raises(ValueError, match="only adapter on its layers"):
        inject_lora(model, rank=2, targets="dense", adapter_name="p", init="olora")
    assert model.get_layer("dense").adapters.names == ("default",)
    for path, value in snapshot(model).items():
        np.testing.assert_array_equal(value, before[path])


def test_pissa_on_a_quantized_kernel_is_refused():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="d")])
    model.quantize("int8")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"quantized \(int8\)"):
        inject_lora(model, rank=2, targets="d", init="pissa")
    assert lora_layers(model) == []
    for path, value in snapshot(model).items():
        np.testing.assert_array_equal(value, before[path])
    # Gaussian leaves the kernel alone, so it is fine over int8.
    inject_lora(model, rank=2, targets="d", init="gaussian")
    assert [layer.name for layer in lora_layers(model)] == ["d"]


def test_loading_factors_into_a_pissa_adapter_is_refused(tmp_path):
    model = two_layer_model()
    inject_lora(model, rank=2, targets="dense")
    save_adapter(model, tmp_path / "plain")
    pissa = two_layer_model()
    inject_lora(pissa, rank=2, targets="dense", init="pissa")
    before = snapshot(pissa)
    with pytest.raises(ValueError, match="PiSSA/OLoRA"):
        load_adapter(pissa, tmp_path / "plain")
    for path, value in snapshot(pissa).items():
        np.testing.assert_array_equal(value, before[path])


def test_pissa_layer_round_trips_through_model_save(tmp_path):
    functional = two_layer_model()
    model = keras.Sequential([keras.Input((3, 12))] + functional.layers[1:])
    inject_lora(model, rank=2, targets=("dense", "heads"), init="pissa")
    randomize_lora_b(model)
    x = inputs()
    expected = out(model, x)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(out(loaded, x), expected, rtol=0, atol=1e-6)
    with disable_lora(loaded):
        with disable_lora(model):
            np.testing.assert_allclose(out(loaded, x), out(model, x), rtol=0, atol=1e-6)


def test_moved_pissa_gpt2_saves_and_exports_for_the_original_weights(tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from keras_lora import export_peft
    from tests import peft_helpers as ph

    hf_dir = ph.save_hf_gpt2(tmp_path / "hf")
    ids = ph.token_ids()
    lm = ph.keras_lm(hf_dir)
    base = ph.keras_outputs(lm, ids)
    inject_lora(lm, rank=2, alpha=4.0, targets=("query", "value"), init="pissa")
    np.testing.assert_allclose(ph.keras_outputs(lm, ids), base, rtol=0, atol=1e-5)
    # Move both factors away from their start, as training does (a real
    # `fit` is in `test_saved_pissa_adapter_applies_to_the_original_base`;
    # compiling GPT-2's train step would cost this test 10 s on JAX).
    rng = np.random.default_rng(0)
    for layer in lora_layers(lm):
        for factor in (layer.lora_a, layer.lora_b):
            noise = rng.normal(0, 0.05, tuple(factor.shape)).astype("float32")
            factor.assign(to_numpy(factor.value) + noise)
    trained = ph.keras_outputs(lm, ids)
    assert np.abs(trained - base).max() > 1e-2

    save_adapter(lm, tmp_path / "adapter")
    fresh = load_adapter(ph.keras_lm(hf_dir), tmp_path / "adapter")
    np.testing.assert_allclose(ph.keras_outputs(fresh, ids), trained, atol=1e-4)

    export_peft(lm, tmp_path / "peft")
    peft_lm = peft.PeftModel.from_pretrained(ph.hf_lm(hf_dir), tmp_path / "peft")
    assert peft_lm.peft_config["default"].r == 8  # (query + value) x 2r.
    np.testing.assert_allclose(
        ph.torch_outputs(peft_lm.eval(), ids), trained, rtol=0, atol=1e-4
    )
    merge_lora(lm)
    np.testing.assert_allclose(ph.keras_outputs(lm, ids), trained, atol=1e-5)
