"""Several named adapters: switch, disable, delete, files, merge, mixed batches."""

import re

import keras
import numpy as np
import pytest

from keras_lora import (
    adapter_batch,
    adapter_names,
    delete_adapter,
    disable_lora,
    export_peft,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    set_adapter,
)
from keras_lora.switching import active_adapters
from tests.helpers import (
    MLP_X,
    device_mesh,
    expected_axes,
    randomize_adapter,
    small_mlp,
    snapshot,
    tiny_gpt2_lm,
    to_numpy,
    token_batch,
    two_adapters,
)


def test_second_adapter_is_added_inactive_with_its_own_settings():
    model, _, out_a, _ = two_adapters()
    up, down = lora_layers(model)
    assert adapter_names(model) == ["default", "b"]
    assert active_adapters(model) == ["default"]
    # The first adapter keeps the layer's attributes and variable paths.
    assert (up.adapter_name, up.rank, up.scale) == ("default", 2, 2.0)
    assert (up.adapters["b"].rank, up.adapters["b"].scale) == (3, 2.0)
    assert up.lora_a.path == "small_mlp/up/lora_a"
    assert up.adapters["b"].lora_a.path == "small_mlp/up/lora_a_b"
    assert down.adapter_name == "b"  # Newly wrapped: "b" is its first.
    np.testing.assert_array_equal(to_numpy(model(MLP_X)), out_a)
    assert [w.path for w in model.trainable_weights] == [
        "small_mlp/up/lora_a",
        "small_mlp/up/lora_b",
    ]


def test_set_adapter_reproduces_each_adapter_and_their_sum():
    model, base, out_a, out_b = two_adapters()
    set_adapter(model, "b")
    np.testing.assert_allclose(to_numpy(model(MLP_X)), out_b, atol=1e-6)
    assert sorted(w.path for w in model.trainable_weights) == [
        "small_mlp/down/lora_a",
        "small_mlp/down/lora_b",
        "small_mlp/up/lora_a_b",
        "small_mlp/up/lora_b_b",
    ]
    set_adapter(model, ["default"])
    np.testing.assert_allclose(to_numpy(model(MLP_X)), out_a, atol=1e-6)
    # Both: the updates add (checked on the first layer's pre-activation).
    set_adapter(model, ["default", "b"])
    up = lora_layers(model)[0]
    h = to_numpy(up.original_layer(MLP_X))
    both = (
        h
        + to_numpy(up.lora_update(MLP_X))
        + to_numpy(up.lora_update(MLP_X, adapter=up.adapters["b"]))
    )
    np.testing.assert_allclose(to_numpy(up(MLP_X)), np.maximum(both, 0), atol=1e-5)
    # Compiled predict follows the switch (traced steps are dropped).
    set_adapter(model, "default")
    np.testing.assert_allclose(model.predict(MLP_X, verbose=0), out_a, atol=1e-5)
    set_adapter(model, "b")
    np.testing.assert_allclose(model.predict(MLP_X, verbose=0), out_b, atol=1e-5)


def test_disable_lora_gives_the_base_outputs_exactly():
    model, base, out_a, _ = two_adapters()
    set_adapter(model, ["default", "b"])
    with disable_lora(model):
        np.testing.assert_array_equal(to_numpy(model(MLP_X)), base)
        np.testing.assert_array_equal(model.predict(MLP_X, verbose=0), base)
    assert not np.allclose(to_numpy(model(MLP_X)), base)


def test_fit_with_b_active_changes_only_b():
    model, _, _, _ = two_adapters()
    set_adapter(model, "b")
    before = snapshot(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    y = np.ones((6, 4), "float32")
    model.fit(MLP_X, y, epochs=2, batch_size=6, verbose=0)
    after = snapshot(model)
    changed = sorted(p for p in before if not np.array_equal(before[p], after[p]))
    assert changed == [
        "small_mlp/down/lora_a",
        "small_mlp/down/lora_b",
        "small_mlp/up/lora_a_b",
        "small_mlp/up/lora_b_b",
    ]


def test_bad_names_are_value_errors_and_change_nothing():
    model, _, out_a, _ = two_adapters()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['default', 'b'\]"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match="repeat"):
        set_adapter(model, ["b", "b"])
    with pytest.raises(ValueError, match=r"\['default', 'b'\]"):
        delete_adapter(model, "c")
    with pytest.raises(ValueError, match="already hold adapter .b.*already wrapped"):
        inject_lora(model, targets="up", adapter_name="b")
    with pytest.raises(ValueError, match="adapter name"):
        inject_lora(model, targets="up", adapter_name="a/b")
    with pytest.raises(ValueError, match=r"\['default', 'b'\]"):
        with adapter_batch(model, ["default", "zzz"] + [None] * 4):
            pass
    with pytest.raises(ValueError, match="6 rows"):
        with adapter_batch(model, ["default", "b"]):
            model(MLP_X)
    assert adapter_names(model) == ["default", "b"]
    assert active_adapters(model) == ["default"]
    after = snapshot(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)
    # The one addition: the control variables of the mixed batch ("up",
    # holding two adapters, had its gates already).
    assert sorted(set(after) - set(before)) == [
        "small_mlp/down/adapter_gates",
        "small_mlp/down/adapter_rows",
        "small_mlp/up/adapter_rows",
    ]
    np.testing.assert_array_equal(to_numpy(model(MLP_X)), out_a)


def test_delete_adapter_promotes_the_next_and_the_last_unwraps():
    model, base, _, out_b = two_adapters()
    set_adapter(model, "b")
    delete_adapter(model, "default")
    up, down = lora_layers(model)
    assert (up.adapter_name, up.rank, up.lora_a.path) == (
        "b",
        3,
        "small_mlp/up/lora_a_b",
    )
    assert not any("lora_a" == w.path.rpartition("/")[2] and "up" in w.path
                   for w in model.weights)  # fmt: skip
    np.testing.assert_allclose(to_numpy(model(MLP_X)), out_b, atol=1e-6)
    delete_adapter(model, "b")
    assert lora_layers(model) == []
    assert [type(x).__name__ for x in model.layers] == ["Dense", "Dense"]
    np.testing.assert_array_equal(to_numpy(model(MLP_X)), base)


def test_save_and_load_one_adapter_each_and_merge_a_chosen_one(tmp_path):
    model, base, out_a, out_b = two_adapters()
    with pytest.raises(ValueError, match="pass `adapter_name=`"):
        save_adapter(model, tmp_path / "x")
    save_adapter(model, tmp_path / "a", adapter_name="default")
    save_adapter(model, tmp_path / "b", adapter_name="b")
    fresh = small_mlp()
    load_adapter(fresh, tmp_path / "b")  # A fresh base: "b" is active.
    np.testing.assert_allclose(to_numpy(fresh(MLP_X)), out_b, atol=1e-6)
    load_adapter(fresh, tmp_path / "a", adapter_name="task_a")  # Added beside.
    assert adapter_names(fresh) == ["b", "task_a"]
    np.testing.assert_allclose(to_numpy(fresh(MLP_X)), out_b, atol=1e-6)
    set_adapter(fresh, "task_a")
    np.testing.assert_allclose(to_numpy(fresh(MLP_X)), out_a, atol=1e-6)
    merge_lora(fresh, adapter_names="b")
    assert lora_layers(fresh) == []
    np.testing.assert_allclose(to_numpy(fresh(MLP_X)), out_b, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_mixed_batch_matches_each_adapter_row_by_row(compiled):
    model, base, out_a, out_b = two_adapters()
    names = ["b", None, "default", "b", "default", None]
    with adapter_batch(model, names):
        mixed = model.predict(MLP_X, verbose=0) if compiled else to_numpy(model(MLP_X))
    expected = {"default": out_a, "b": out_b, None: base}
    for i, name in enumerate(names):
        np.testing.assert_allclose(mixed[i], expected[name][i], atol=1e-5)
    # Outside the context the active adapter is back.
    np.testing.assert_allclose(to_numpy(model(MLP_X)), out_a, atol=1e-6)


def test_gpt2_mixed_batch_and_switch_match_single_adapters():
    lm = tiny_gpt2_lm()
    batch = token_batch(batch=3)
    base = to_numpy(lm(batch))
    inject_lora(lm, rank=2, targets=("query", "value"), seed=1)
    inject_lora(lm, rank=4, targets=("query", "attention_output"), adapter_name="b")
    randomize_adapter(lm, "default", 3)
    randomize_adapter(lm, "b", 4)
    out_a = to_numpy(lm(batch))
    set_adapter(lm, "b")
    out_b = to_numpy(lm(batch))
    assert not np.allclose(out_a, out_b, atol=1e-4)
    with disable_lora(lm):
        np.testing.assert_array_equal(to_numpy(lm(batch)), base)
    names = ["default", None, "b"]
    with adapter_batch(lm, names):
        mixed = to_numpy(lm(batch))
    for i, expected in enumerate((out_a, base, out_b)):
        np.testing.assert_allclose(mixed[i], expected[i], atol=1e-5)


def _gpt2_with_two_adapters():
    """A tiny greedy GPT-2 with adapters "default" (rank 2) and "b" (rank
    4), both with random B, and three left-padded prompts."""
    lm = tiny_gpt2_lm()
    lm.compile(sampler="greedy")
    inject_lora(lm, rank=2, seed=1)
    inject_lora(lm, rank=4, adapter_name="b")
    rng = np.random.default_rng(0)
    for layer in lora_layers(lm):
        for name in layer.adapters.names:
            b = layer.adapters[name].lora_b
            b.assign(rng.normal(0, 2.0, b.shape).astype("float32"))
    prompts = {
        "token_ids": rng.integers(0, 64, (3, 10)).astype("int32"),
        "padding_mask": np.array([[1] * 4 + [0] * 6] * 3, "int32"),
    }
    return lm, prompts


def test_gpt2_generate_in_a_mixed_batch_matches_each_adapter():
    lm, prompts = _gpt2_with_two_adapters()

    def generate():
        return to_numpy(lm.generate(prompts, stop_token_ids=None)["token_ids"])

    alone = {}
    for name in ("default", "b"):
        set_adapter(lm, name)
        alone[name] = generate()
    assert not np.array_equal(alone["default"], alone["b"])
    with adapter_batch(lm, ["b", "default", "b"]):
        mixed = generate()
    np.testing.assert_array_equal(mixed[0], alone["b"][0])
    np.testing.assert_array_equal(mixed[1], alone["default"][1])
    np.testing.assert_array_equal(mixed[2], alone["b"][2])


def test_export_peft_needs_a_known_adapter_name_with_several_adapters(tmp_path):
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2)
    inject_lora(lm, rank=2, adapter_name="second")
    with pytest.raises(ValueError, match="several adapters.*adapter_name="):
        export_peft(lm, tmp_path / "peft")
    with pytest.raises(ValueError, match=r"\['default', 'second'\]"):
        export_peft(lm, tmp_path / "peft", adapter_name="third")
    assert not (tmp_path / "peft").exists()


def test_the_same_name_grows_onto_more_layers_with_their_own_rank():
    # One `inject_lora` call per rank, as PEFT's rank_pattern does in one.
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, name="up"),
            keras.layers.Dense(4, name="down"),
        ]
    )
    inject_lora(model, rank=2, targets="up")
    inject_lora(model, rank=3, targets="down")
    assert adapter_names(model) == ["default"]
    assert {x.name: x.rank for x in lora_layers(model)} == {"up": 2, "down": 3}
    assert active_adapters(model) == ["default"]
    assert len(model.trainable_weights) == 4


def adapter_settings(model) -> dict:
    """Per layer and adapter: rank, alpha, scale, dropout; and the active set."""
    return {
        (layer.name, name): (a.rank, a.alpha, a.scale, a.dropout)
        for layer in lora_layers(model)
        for name, a in layer.adapters.by_name.items()
    }


@pytest.mark.parametrize("delete_first", [False, True])
def test_model_save_keeps_every_adapter(tmp_path, delete_first):
    model, _, _, _ = two_adapters()
    inject_lora(model, rank=1, alpha=3.0, dropout=0.2, targets="down", adapter_name="c")
    randomize_adapter(model, "c", 5)
    if delete_first:  # "b" becomes the first adapter of "up".
        delete_adapter(model, "default")
    set_adapter(model, ["b", "c"])
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    assert adapter_names(restored) == adapter_names(model)
    assert active_adapters(restored) == ["b", "c"]
    assert adapter_settings(restored) == adapter_settings(model)
    # The same factors train (a promoted first adapter's come back named
    # "lora_a"/"lora_b", as the first adapter's always are).
    names = [re.sub("^(lora_[ab])_b$", r"\1", w.name) for w in model.trainable_weights]
    if not delete_first:
        names = [w.name for w in model.trainable_weights]
    assert [w.name for w in restored.trainable_weights] == names
    np.testing.assert_array_equal(to_numpy(restored(MLP_X)), to_numpy(model(MLP_X)))
    for name in adapter_names(model):
        set_adapter(model, name)
        set_adapter(restored, name)
        np.testing.assert_array_equal(to_numpy(restored(MLP_X)), to_numpy(model(MLP_X)))


def test_merge_lora_adds_exactly_the_chosen_adapters():
    model, base, out_a, out_b = two_adapters()
    assert active_adapters(model) == ["default"]
    merge_lora(model, adapter_names="b")  # Not the active one.
    np.testing.assert_allclose(to_numpy(model(MLP_X)), out_b, atol=1e-5)
    model, base, out_a, out_b = two_adapters()
    set_adapter(model, ["default", "b"])
    both = to_numpy(model(MLP_X))
    set_adapter(model, "b")
    merge_lora(model, adapter_names=["default", "b"])
    np.testing.assert_allclose(to_numpy(model(MLP_X)), both, atol=1e-5)
    model, _, _, _ = two_adapters()
    with pytest.raises(ValueError, match=r"\['default', 'b'\]"):
        merge_lora(model, adapter_names="c")
    assert adapter_names(model) == ["default", "b"]


def test_layout_map_lays_out_every_adapter_like_the_first():
    from keras_lora import gpt2_layout_map

    lm = tiny_gpt2_lm(num_heads=4)
    inject_lora(lm, rank=2, targets=("query", "value"))
    inject_lora(lm, rank=4, targets=("query", "attention_output"), adapter_name="b")
    layout_map = gpt2_layout_map(device_mesh())
    later = 0
    for variable in lm.weights:
        path, ndim = variable.path, len(variable.shape)
        keys = [k for k in layout_map if re.search(k, path)]
        assert len(keys) <= 1, (path, keys)
        layer, name = path.split("/")[-2:]
        if name.startswith(("lora_a_", "lora_b_")):
            later += 1
            first = path[: -len("_b")]  # ".../query/lora_a_b" -> "/lora_a".
            layout = layout_map[path]
            assert layout is not None, path
            assert list(layout.axes) == expected_axes(first, ndim), path
    assert later == 2 * 2  # "b" on the query of each of the two blocks.


def count_calls(layer) -> list:
    """Count the Python runs of `layer.call`: under JAX and TensorFlow one
    per trace of a compiled step; torch runs steps eagerly (one per call)."""
    runs = []
    call = layer.call

    def counted(*args, **kwargs):
        runs.append(1)
        return call(*args, **kwargs)

    layer.call = counted
    return runs


TRACES = keras.backend.backend() != "torch"


def test_mixed_batches_and_switches_reuse_the_traced_predict():
    model, base, out_a, out_b = two_adapters()
    set_adapter(model, "default")  # The first switch creates the gates.
    runs = count_calls(lora_layers(model)[0])
    np.testing.assert_allclose(model.predict(MLP_X, verbose=0), out_a, atol=1e-5)
    traced = len(runs)
    assert traced == 1 or not TRACES
    step = model.predict_function
    # Switching assigns variables: the same traced step serves "b".
    set_adapter(model, "b")
    np.testing.assert_allclose(model.predict(MLP_X, verbose=0), out_b, atol=1e-5)
    with disable_lora(model):
        np.testing.assert_array_equal(model.predict(MLP_X, verbose=0), base)
    set_adapter(model, "default")
    np.testing.assert_allclose(model.predict(MLP_X, verbose=0), out_a, atol=1e-5)
    assert len(runs) == (traced if TRACES else 4)
    if keras.backend.backend() != "jax":  # (JAX wraps it: see traces.py.)
        assert model.predict_function is step
    # Mixed batches: one trace for the mode, then other names reuse it.
    expected = {"default": out_a, "b": out_b, None: base}
    for names in (
        ["b", None, "default", "b", "default", None],
        ["default", "b", None, None, "b", "b"],
        ["b"] * 6,
    ):
        with adapter_batch(model, names):
            mixed = model.predict(MLP_X, verbose=0)
        for i, name in enumerate(names):
            np.testing.assert_allclose(mixed[i], expected[name][i], atol=1e-5)
    assert len(runs) == (traced + 1 if TRACES else 7)
    # Back outside: the plain step is kept. JAX traces it once more: the
    # first mixed batch of this size added rows variables to its state.
    np.testing.assert_allclose(model.predict(MLP_X, verbose=0), out_a, atol=1e-5)
    traced += keras.backend.backend() == "jax"
    assert len(runs) == (traced + 1 if TRACES else 8)
    # From then on each mode keeps its step.
    with adapter_batch(model, [None] * 3 + ["default"] * 3):
        mixed = model.predict(MLP_X, verbose=0)
    np.testing.assert_allclose(mixed[:3], base[:3], atol=1e-5)
    np.testing.assert_allclose(mixed[3:], out_a[3:], atol=1e-5)
    set_adapter(model, "b")
    np.testing.assert_allclose(model.predict(MLP_X, verbose=0), out_b, atol=1e-5)
    assert len(runs) == (traced + 1 if TRACES else 10)
    # Another size: the mixed step is traced for it, the plain one kept.
    with adapter_batch(model, ["b", "default", None]):
        mixed = model.predict(MLP_X[:3], verbose=0)
    np.testing.assert_allclose(mixed[0], out_b[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], out_a[1], atol=1e-5)
    np.testing.assert_allclose(mixed[2], base[2], atol=1e-5)


def test_gpt2_generate_is_traced_once_for_switches_and_mixed_batches():
    lm, prompts = _gpt2_with_two_adapters()
    runs = count_calls(lora_layers(lm)[0])

    def generate():
        return to_numpy(lm.generate(prompts, stop_token_ids=None)["token_ids"])

    alone = {"default": generate()}
    traced = len(runs)  # keras-hub traces the call for the prompt and a step.
    step = lm.generate_function
    set_adapter(lm, "b")
    alone["b"] = generate()
    assert not np.array_equal(alone["default"], alone["b"])
    assert len(runs) == traced or not TRACES
    if keras.backend.backend() != "jax":
        assert lm.generate_function is step
    set_adapter(lm, "default")
    np.testing.assert_array_equal(generate(), alone["default"])
    assert len(runs) == traced or not TRACES
    with adapter_batch(lm, ["b", "default", "b"]):
        mixed = generate()
    after_first_mix = len(runs)
    with adapter_batch(lm, ["default", "b", "default"]):
        mixed_2 = generate()
    assert len(runs) == after_first_mix or not TRACES
    for i, name in enumerate(["b", "default", "b"]):
        np.testing.assert_array_equal(mixed[i], alone[name][i])
    for i, name in enumerate(["default", "b", "default"]):
        np.testing.assert_array_equal(mixed_2[i], alone[name][i])


def test_a_switched_model_saves_and_loads_as_keras_file(tmp_path):
    # The switch variables (gates) stay out of the file: a LoraLayer
    # rebuilt from its config has none.
    model = small_mlp()
    inject_lora(model, rank=2, targets="up", seed=1)
    randomize_adapter(model, "default", 1)
    with disable_lora(model):
        np.testing.assert_array_equal(
            to_numpy(model(MLP_X)), to_numpy(small_mlp()(MLP_X))
        )
    assert "small_mlp/up/adapter_gates" in snapshot(model)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(
        to_numpy(loaded(MLP_X)), to_numpy(model(MLP_X)), atol=1e-6
    )
