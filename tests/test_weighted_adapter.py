"""add_weighted_adapter: "cat", "linear" and "svd", against their formulas
and against PEFT's own `add_weighted_adapter` on the same factors."""

import json

import keras
import numpy as np
import pytest
import safetensors.numpy

from keras_lora import (
    adapter_names,
    add_weighted_adapter,
    export_peft,
    inject_lora,
    lora_layers,
    set_adapter,
)
from keras_lora.switching import active_adapters
from tests.helpers import (
    MLP_X,
    randomize_adapter,
    small_mlp,
    snapshot,
    to_numpy,
    two_adapters,
)


def updates(model, name) -> dict:
    """Adapter `name`'s `scale * A B` per layer, as (fan_in, fan_out)."""
    return {
        layer.name: to_numpy(layer.delta(name)).reshape(layer.split.fan_in, -1)
        for layer in lora_layers(model)
        if name in layer.adapters
    }


def matrices(layer, name):
    adapter = layer.adapters[name]
    a = to_numpy(adapter.lora_a.value).reshape(-1, adapter.rank)
    b = to_numpy(adapter.lora_b.value).reshape(adapter.rank, -1)
    return a, b


def test_cat_is_exact_and_concatenates_the_ranks():
    model, _, _, _ = two_adapters()  # "default" r2 on up; "b" r3 on up, down.
    set_adapter(model, ["default", "b"])
    both = to_numpy(model(MLP_X))
    add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "sum")
    add_weighted_adapter(model, ["default", "b"], [0.5, -2.0], "mix", "cat")
    # Added inactive and frozen, like any adapter.
    assert adapter_names(model) == ["default", "b", "sum", "mix"]
    assert active_adapters(model) == ["default", "b"]
    up, down = lora_layers(model)
    # PEFT's rank: the sum of the adapters' ranks, on every layer ("down"
    # holds only "b": its last two columns are zero).
    assert (up.adapters["mix"].rank, down.adapters["mix"].rank) == (5, 5)
    assert up.adapters["mix"].scale == 1.0
    a, b = matrices(down, "mix")
    assert np.all(a[:, 3:] == 0) and np.all(b[3:] == 0)
    set_adapter(model, "sum")
    np.testing.assert_allclose(to_numpy(model(MLP_X)), both, atol=1e-5)
    mine = updates(model, "mix")
    d, e = updates(model, "default"), updates(model, "b")
    np.testing.assert_allclose(mine["up"], 0.5 * d["up"] - 2 * e["up"], atol=1e-5)
    np.testing.assert_allclose(mine["down"], -2 * e["down"], atol=1e-5)
    # Only the active combination trains.
    set_adapter(model, "mix")
    assert sorted(w.name for w in model.trainable_weights) == [
        "lora_a_mix",
        "lora_a_mix",
        "lora_b_mix",
        "lora_b_mix",
    ]


def test_linear_weights_the_factors_as_peft():
    model = small_mlp()
    inject_lora(model, rank=2, alpha=4.0, targets=("up", "down"), seed=1)
    inject_lora(model, rank=2, alpha=8.0, targets="up", adapter_name="b", seed=2)
    randomize_adapter(model, "default", 1)
    randomize_adapter(model, "b", 2)
    add_weighted_adapter(model, ["default", "b"], [0.7, -0.3], "lin", "linear")
    up, down = lora_layers(model)
    (a1, b1), (a2, b2) = matrices(up, "default"), matrices(up, "b")
    w1, w2 = 0.7 * 2.0, -0.3 * 4.0  # weight * scale
    a, b = matrices(up, "lin")
    np.testing.assert_allclose(a, np.sqrt(w1) * a1 - np.sqrt(-w2) * a2, atol=1e-6)
    np.testing.assert_allclose(b, np.sqrt(w1) * b1 + np.sqrt(-w2) * b2, atol=1e-6)
    a, b = matrices(down, "lin")  # "b" is not on "down".
    a1, b1 = matrices(down, "default")
    np.testing.assert_allclose(a, np.sqrt(w1) * a1, atol=1e-6)
    np.testing.assert_allclose(b, np.sqrt(w1) * b1, atol=1e-6)
    # One adapter: PEFT turns any combination into "linear".
    add_weighted_adapter(model, ["b"], [2.0], "twice", "cat")
    assert up.adapters["twice"].rank == 2
    np.testing.assert_allclose(
        updates(model, "twice")["up"], 2 * updates(model, "b")["up"], atol=1e-5
    )


def test_svd_keeps_the_best_rank_r_approximation():
    model, _, _, _ = two_adapters()
    add_weighted_adapter(model, ["default", "b"], [1.0, 0.5], "full", "svd", svd_rank=5)
    add_weighted_adapter(model, ["default", "b"], [1.0, 0.5], "low", "svd")
    d, e = updates(model, "default"), updates(model, "b")
    target = {"up": d["up"] + 0.5 * e["up"], "down": 0.5 * e["down"]}
    full, low = updates(model, "full"), updates(model, "low")
    for name, delta in target.items():
        # Rank 5 holds the whole update; the default rank (3, the largest)
        # is its truncated SVD.
        np.testing.assert_allclose(full[name], delta, atol=1e-5)
        u, s, vh = np.linalg.svd(delta.astype("float64"))
        best = (u[:, :3] * s[:3]) @ vh[:3]
        np.testing.assert_allclose(low[name], best, atol=1e-5)
    assert lora_layers(model)[0].adapters["low"].rank == 3
    # Clamping bounds every factor entry by the chosen quantile.
    add_weighted_adapter(
        model, ["default", "b"], [1.0, 0.5], "clamped", "svd", svd_clamp=0.9
    )
    up = lora_layers(model)[0]
    a, b = matrices(up, "clamped")
    a_low, b_low = matrices(up, "low")
    values = np.concatenate([a_low.ravel(), b_low.ravel()])
    high = np.quantile(values, 0.9)
    assert np.abs(a).max() <= high + 1e-6 and np.abs(b).max() <= high + 1e-6
    assert np.abs(a_low).max() > high  # The bound did cut something.


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((["default", "zzz"], [1, 1], "m"), {}, r"\['default', 'b'\]"),
        ((["default", "default"], [1, 1], "m"), {}, "repeat"),
        (([], [], "m"), {}, r"\['default', 'b'\]"),
        ((["default", "b"], [1.0], "m"), {}, r"one finite number.*\['default', 'b'\]"),
        ((["default", "b"], [1.0, float("nan")], "m"), {}, "finite"),
        ((["default", "b"], [1, 1], "b"), {}, r"already holds .*\['default', 'b'\]"),
        ((["default", "b"], [1, 1], "a/b"), {}, "adapter name"),
        ((["default", "b"], [1, 1], "m", "ties"), {}, "combination"),
        ((["default", "b"], [1, 1], "m", "linear"), {}, "one rank"),
        ((["default", "b"], [1, 1], "m", "svd"), {"svd_rank": 0}, "svd_rank"),
        ((["default", "b"], [1, 1], "m", "svd"), {"svd_clamp": 1.5}, "svd_clamp"),
    ],
)
def test_bad_input_is_a_value_error_and_changes_nothing(args, kwargs, match):
    model, _, out_a, _ = two_adapters()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        add_weighted_adapter(model, *args, **kwargs)
    assert adapter_names(model) == ["default", "b"]
    after = snapshot(model)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)
    np.testing.assert_array_equal(to_numpy(model(MLP_X)), out_a)


def test_linear_keeps_each_layers_rank_and_refuses_mixed_ranks():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, name="p"),
            keras.layers.Dense(3, name="q"),
        ]
    )
    # "default": rank 2 on p, 1 on q; "b": rank 1 on p, 2 on q. Both have
    # PEFT rank 2, but no layer holds one rank.
    inject_lora(model, rank=2, targets="p")
    inject_lora(model, rank=1, targets="q")
    inject_lora(model, rank=1, targets="p", adapter_name="b")
    inject_lora(model, rank=2, targets="q", adapter_name="b")
    with pytest.raises(ValueError, match="layer 'p' has ranks \\[1, 2\\]"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "m", "linear")
    assert adapter_names(model) == ["default", "b"]
    # One adapter with a rank per layer (PEFT's rank_pattern) keeps them.
    randomize_adapter(model, "default", 3)
    add_weighted_adapter(model, ["default"], [-2.0], "m", "cat")
    p, q = lora_layers(model)
    assert (p.adapters["m"].rank, q.adapters["m"].rank) == (2, 1)
    for name, update in updates(model, "m").items():
        np.testing.assert_allclose(
            update, -2 * updates(model, "default")[name], atol=1e-5
        )


# --- against PEFT -----------------------------------------------------------

COMBINATIONS = {
    # combination, ranks of the two adapters, weights, svd_rank
    "cat": ("cat", (2, 3), (0.7, -1.3), None),
    "linear": ("linear", (2, 2), (0.7, -1.3), None),
    "svd": ("svd", (2, 2), (0.7, -1.3), 3),  # Rank 4 cut to 3: lossy.
    "svd_default_rank": ("svd", (2, 3), (1.0, 0.5), None),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("torch")
    from tests import peft_helpers as ph

    return ph.save_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2"))


@pytest.mark.parametrize("case", COMBINATIONS)
def test_weighted_adapter_matches_peft(case, hf_dir, tmp_path):
    # PEFT computes the reference in torch, whatever the Keras backend.
    pytest.importorskip("torch")
    import peft
    from peft.utils import get_peft_model_state_dict

    from tests import peft_helpers as ph

    combination, ranks, weights, svd_rank = COMBINATIONS[case]
    ids = ph.token_ids()
    lm = ph.keras_lm(hf_dir)
    # Query alone in GPT-2's fused c_attn, so that PEFT's SVD of the fused
    # module is the SVD of the query update (see the docstring).
    targets = ("query", "attention_output", "feedforward_output_dense")
    inject_lora(lm, rank=ranks[0], alpha=4.0, targets=targets, seed=1)
    inject_lora(lm, rank=ranks[1], alpha=6.0, targets=targets[:2], adapter_name="b")
    rng = np.random.default_rng(0)
    for layer in lora_layers(lm):
        for name in layer.adapters.names:
            for v in layer.adapters[name].variables:
                v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    export_peft(lm, tmp_path / "a", adapter_name="default")
    export_peft(lm, tmp_path / "b", adapter_name="b")

    reference = peft.PeftModel.from_pretrained(
        ph.hf_lm(hf_dir), tmp_path / "a", adapter_name="default"
    )
    reference.load_adapter(tmp_path / "b", adapter_name="b")
    reference.add_weighted_adapter(
        ["default", "b"], list(weights), "mix", combination_type=combination,
        svd_rank=svd_rank,
    )  # fmt: skip
    reference.set_adapter("mix")
    reference.eval()
    expected = ph.torch_outputs(reference, ids)

    add_weighted_adapter(
        lm, ["default", "b"], list(weights), "mix", combination, svd_rank=svd_rank
    )
    set_adapter(lm, "mix")
    logits = ph.keras_outputs(lm, ids)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    set_adapter(lm, "default")  # The combination is not one adapter alone.
    assert np.max(np.abs(ph.keras_outputs(lm, ids) - logits)) > 1e-2

    # The factors themselves: the Keras "mix" written as PEFT's.
    export_peft(lm, tmp_path / "mix", adapter_name="mix")
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    ours = safetensors.numpy.load_file(tmp_path / "mix" / "adapter_model.safetensors")
    theirs = {
        k: v.float().numpy()
        for k, v in get_peft_model_state_dict(reference, adapter_name="mix").items()
    }
    assert ours.keys() == theirs.keys()
    assert config["r"] == reference.peft_config["mix"].r
    for key in ours:
        if key.endswith("lora_A.weight"):
            other = key.replace("lora_A", "lora_B")
            ours_update = ours[other] @ ours[key]
            theirs_update = theirs[other] @ theirs[key]
            np.testing.assert_allclose(ours_update, theirs_update, atol=1e-5)
        if combination != "svd":  # An SVD's signs are the library's choice.
            np.testing.assert_allclose(ours[key], theirs[key], atol=1e-5)
