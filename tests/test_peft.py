"""PEFT interop for keras-hub GPT-2, checked against real transformers + peft.

The Keras side runs on KERAS_BACKEND; torch, transformers and peft only
compute the reference. A tiny random GPT-2 is saved by transformers and
loaded into keras-hub by its own converter, so both sides hold the same
base weights.
"""

import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import peft  # noqa: E402
import safetensors.numpy  # noqa: E402
import transformers  # noqa: E402

from keras_lora import (  # noqa: E402
    LoraLayer,
    adapter_names,
    inject_lora,
    lora_layers,
    merge_lora,
    set_adapter,
)
from keras_lora.families import GPT2  # noqa: E402
from keras_lora.interop import (  # noqa: E402
    export_hf_model,
    export_peft,
    import_peft,
    peft_format,
)
from keras_lora.surgery import walk_layers  # noqa: E402
from keras_lora.switching import active_adapters  # noqa: E402
from tests import peft_helpers as ph  # noqa: E402
from tests.helpers import randomize_lora_b, snapshot  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return ph.save_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2"))


@pytest.fixture(scope="module")
def ids():
    return ph.token_ids()


@pytest.fixture(scope="module")
def base_logits(hf_dir, ids):
    return ph.torch_outputs(ph.hf_lm(hf_dir), ids)


def assert_close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def assert_adapter_matters(logits, base_logits):
    # The adapter must move the logits far more than the tolerance, or a
    # factor dropped on the way would go unnoticed.
    assert np.max(np.abs(logits - base_logits)) > 100 * ATOL


def peft_adapter(hf_dir, out_dir, dtype=None, **config) -> str:
    """Save a PEFT adapter with random (non-zero) A and B; return its dir."""
    torch.manual_seed(0)
    config.setdefault("init_lora_weights", False)
    config.setdefault("fan_in_fan_out", True)  # GPT-2 uses Conv1D.
    model = peft.get_peft_model(ph.hf_lm(hf_dir), peft.LoraConfig(**config))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir)
    return os.fspath(out_dir)


_ROLE_TO_MODULE = {p.role: p.hf_module for p in GPT2.projections}
# "transformer_layer_(\d+)/": a keras-hub block's path, with its index.
_BLOCK = re.compile(
    r"(\d+)".join(re.escape(part) for part in GPT2.block.split("{block}")) + "/"
)


def _peft_lora_modules(model) -> dict:
    """`transformer.h.{i}.{module}` -> PEFT LoRA layer."""
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def _keras_lora_modules(lm) -> list:
    """`(PEFT module name, LoraLayer)` for every LoraLayer of a GPT-2."""
    found = []
    for path, layer in walk_layers(lm):
        if isinstance(layer, LoraLayer):
            block = _BLOCK.search(path)[1]
            module = _ROLE_TO_MODULE[layer.name]
            found.append((f"transformer.h.{block}.{module}", layer))
    return found


# --- base weights -----------------------------------------------------------


def test_base_logits_match_transformers(hf_dir, ids, base_logits):
    lm = ph.keras_lm(hf_dir)
    logits = ph.keras_outputs(lm, ids)
    assert_close(logits, base_logits)
    assert np.std(base_logits) > 0.1  # Not a near-constant random model.


def test_from_preset_with_tokenizer_files(hf_dir, tmp_path):
    # A Hugging Face GPT-2 directory with vocab.json and merges.txt (as on
    # the hub) also gives the preprocessor.
    for name in os.listdir(hf_dir):
        with open(os.path.join(hf_dir, name), "rb") as src:
            (tmp_path / name).write_bytes(src.read())
    ph.write_tiny_tokenizer(tmp_path)
    lm = keras_hub.models.GPT2CausalLM.from_preset(os.fspath(tmp_path))
    tokens = keras.ops.convert_to_numpy(lm.preprocessor.tokenizer("ab c"))
    assert tokens.tolist() == [28, 1, 4]


# --- Keras -> PEFT ----------------------------------------------------------

# Each case: the `inject_lora` calls (targets, rank, alpha), and use_rslora.
EXPORT_CASES = {
    "qv_r4_a8": ([(("query", "value"), 4, 8.0)], False),
    "qkv_r2_a16_rslora": ([(("query", "key", "value"), 2, 16.0)], True),
    "value_only_r3_a5": ([(("value",), 3, 5.0)], False),
    "all_six_r2_a4": ([(GPT2.roles, 2, 4.0)], False),
    "all_six_r1_a32_rslora": ([(GPT2.roles, 1, 32.0)], True),
    "mixed_ranks_rslora": (
        [(("query", "value"), 2, 4.0), (("feedforward_.*_dense",), 4, 2.0)],
        True,
    ),
    "mixed_ranks": (
        [
            (("key", "attention_output"), 1, 3.0),
            (("feedforward_output_dense",), 4, 2.0),
        ],
        False,
    ),
    "some_blocks": (
        [
            ((".*transformer_layer_0/.*/query",), 2, 4.0),
            ((".*transformer_layer_1/.*/attention_output",), 2, 4.0),
        ],
        False,
    ),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_matches_peft(case, hf_dir, ids, base_logits, tmp_path):
    calls, use_rslora = EXPORT_CASES[case]
    lm = ph.keras_lm(hf_dir)
    for targets, rank, alpha in calls:
        inject_lora(lm, rank=rank, alpha=alpha, targets=targets, use_rslora=use_rslora)
    randomize_lora_b(lm, scale=0.5)
    keras_logits = ph.keras_outputs(lm, ids)
    assert_adapter_matters(keras_logits, base_logits)

    adapter = export_peft(lm, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is use_rslora
    model = peft.PeftModel.from_pretrained(ph.hf_lm(hf_dir), adapter).eval()
    assert_close(ph.torch_outputs(model, ids), keras_logits)

    # PEFT applies each Keras layer's scale (lora_alpha was chosen for the
    # fused rank) on exactly the modules that have LoRA in Keras.
    peft_modules = _peft_lora_modules(model)
    keras_modules = _keras_lora_modules(lm)
    assert peft_modules.keys() == {name for name, _ in keras_modules}
    for name, layer in keras_modules:
        assert peft_modules[name].scaling["default"] == pytest.approx(layer.scale)

    # And back: the exported adapter imports to the same logits.
    fresh = ph.keras_lm(hf_dir)
    import_peft(fresh, adapter)
    assert_close(ph.keras_outputs(fresh, ids), keras_logits)


def test_export_mixed_rslora(hf_dir, ids, tmp_path):
    # PEFT's use_rslora is one flag; lora_alpha then carries each scale.
    lm = ph.keras_lm(hf_dir)
    inject_lora(lm, rank=4, alpha=8.0, targets=("query", "value"), use_rslora=True)
    inject_lora(lm, rank=2, alpha=4.0, targets="feedforward_intermediate_dense")
    randomize_lora_b(lm, scale=0.5)
    adapter = export_peft(lm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    # c_attn: scale 8 / sqrt(4) = 4 at fused rank 8 -> lora_alpha 32; c_fc
    # (scale 2) goes into the patterns, keyed by escaped module names.
    assert (config["r"], config["lora_alpha"]) == (8, 32)
    c_fc = {r"h\.0\.mlp\.c_fc", r"h\.1\.mlp\.c_fc"}
    assert config["rank_pattern"] == dict.fromkeys(c_fc, 2)
    assert config["alpha_pattern"] == dict.fromkeys(c_fc, 4)
    model = peft.PeftModel.from_pretrained(ph.hf_lm(hf_dir), adapter).eval()
    assert_close(ph.torch_outputs(model, ids), ph.keras_outputs(lm, ids))


def test_export_fused_c_attn_layout(hf_dir, tmp_path):
    # Query rank 2 + value rank 2 -> c_attn rank 4: A stacked, B
    # block-diagonal with zero key rows, lora_alpha = scale * 4.
    lm = ph.keras_lm(hf_dir)
    inject_lora(lm, rank=2, alpha=6.0, targets=("query", "value"))
    randomize_lora_b(lm)
    export_peft(lm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 12)
    assert config["target_modules"] == ["attn.c_attn"]
    assert config["fan_in_fan_out"] is True
    tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    lora_a = tensors[f"{prefix}.lora_A.weight"]
    lora_b = tensors[f"{prefix}.lora_B.weight"]
    assert lora_a.shape == (4, 16) and lora_b.shape == (48, 4)
    query, value = lora_layers(lm)[:2]
    to_np = keras.ops.convert_to_numpy
    np.testing.assert_array_equal(lora_a[:2], to_np(query.lora_a).T)
    np.testing.assert_array_equal(lora_a[2:], to_np(value.lora_a).T)
    np.testing.assert_array_equal(lora_b[:16, :2], to_np(query.lora_b).reshape(2, 16).T)
    np.testing.assert_array_equal(lora_b[32:, 2:], to_np(value.lora_b).reshape(2, 16).T)
    assert not lora_b[16:32].any() and not lora_b[:16, 2:].any()
    assert not lora_b[32:, :2].any()


def test_export_backbone_to_gpt2_model(hf_dir, ids, tmp_path):
    backbone = keras_hub.models.GPT2Backbone.from_preset(hf_dir)
    inject_lora(backbone, rank=3, alpha=6.0, targets=GPT2.roles)
    randomize_lora_b(backbone, scale=0.5)
    adapter = export_peft(backbone, tmp_path, hf_model="GPT2Model")
    base = transformers.GPT2Model.from_pretrained(hf_dir).eval()
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    hidden = ph.keras_outputs(backbone, ids)
    assert_close(ph.torch_outputs(model, ids), hidden)

    # Keys without "transformer." (a GPT2Model adapter) import as well.
    fresh = keras_hub.models.GPT2Backbone.from_preset(hf_dir)
    import_peft(fresh, adapter)
    assert_close(ph.keras_outputs(fresh, ids), hidden)


# --- PEFT -> Keras ----------------------------------------------------------

IMPORT_CASES = {
    "c_attn_r4_a8": dict(target_modules=["c_attn"], r=4, lora_alpha=8),
    "c_attn_r2_a16_rslora": dict(
        target_modules=["c_attn"], r=2, lora_alpha=16, use_rslora=True
    ),
    "c_attn_c_proj_c_fc_r3_a5": dict(
        target_modules=["c_attn", "c_proj", "c_fc"], r=3, lora_alpha=5
    ),
    "projections_r1_a1_dropout": dict(
        target_modules=["attn.c_proj", "mlp.c_proj"],
        r=1,
        lora_alpha=1,
        lora_dropout=0.1,
    ),
    "patterns": dict(
        target_modules=["c_attn", "mlp.c_fc"],
        r=4,
        lora_alpha=8,
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={r"h\.0\..*": 3},
    ),
    "all_linear_rslora": dict(
        target_modules="all-linear", r=2, lora_alpha=3, use_rslora=True
    ),
    "layers_to_transform": dict(
        target_modules=["c_attn", "c_fc"], r=2, lora_alpha=4, layers_to_transform=[1]
    ),
}


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_import_matches_peft(case, hf_dir, ids, base_logits, tmp_path):
    config = IMPORT_CASES[case]
    adapter = peft_adapter(hf_dir, tmp_path, **config)
    reference = peft.PeftModel.from_pretrained(ph.hf_lm(hf_dir), adapter).eval()
    peft_logits = ph.torch_outputs(reference, ids)
    assert_adapter_matters(peft_logits, base_logits)

    lm = ph.keras_lm(hf_dir)
    import_peft(lm, adapter)
    assert_close(ph.keras_outputs(lm, ids), peft_logits)

    # Each PEFT module became LoraLayers with its rank and scale (query, key
    # and value for c_attn).
    peft_modules = _peft_lora_modules(reference)
    keras_modules = _keras_lora_modules(lm)
    layers = [layer for _, layer in keras_modules]
    assert peft_modules.keys() == {name for name, _ in keras_modules}
    assert len(layers) == len(peft_modules) + 2 * sum(
        name.endswith("c_attn") for name in peft_modules
    )
    for name, layer in keras_modules:
        assert layer.rank == peft_modules[name].r["default"]
        assert layer.scale == pytest.approx(peft_modules[name].scaling["default"])
    assert {layer.dropout for layer in layers} == {config.get("lora_dropout", 0.0)}
    assert {layer.use_rslora for layer in layers} == {config.get("use_rslora", False)}
    # Only the LoRA factors train, as after `inject_lora`.
    assert len(lm.trainable_weights) == 2 * len(layers)


def test_import_splits_c_attn(hf_dir, tmp_path):
    adapter = peft_adapter(hf_dir, tmp_path, target_modules=["c_attn"], r=2)
    tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.transformer.h.1.attn.c_attn"
    lora_a = tensors[f"{prefix}.lora_A.weight"]
    lora_b = tensors[f"{prefix}.lora_B.weight"]
    lm = ph.keras_lm(hf_dir)
    import_peft(lm, adapter)
    block = lm.backbone.transformer_layers[1]._self_attention_layer
    to_np = keras.ops.convert_to_numpy
    for i, layer in enumerate(
        (block._query_dense, block._key_dense, block._value_dense)
    ):
        assert tuple(layer.lora_b.shape) == (2, 2, 8)  # (rank, heads, head_dim)
        np.testing.assert_array_equal(to_np(layer.lora_a), lora_a.T)
        expected_b = lora_b[16 * i : 16 * (i + 1)].T.reshape(2, 2, 8)
        np.testing.assert_array_equal(to_np(layer.lora_b), expected_b)


def test_import_bfloat16_adapter(hf_dir, tmp_path):
    # PEFT saves in the model's dtype, here bfloat16.
    adapter = peft_adapter(
        hf_dir, tmp_path, dtype=torch.bfloat16, target_modules=["c_fc"], r=2
    )
    model = peft.PeftModel.from_pretrained(ph.hf_lm(hf_dir), adapter)
    c_fc = model.base_model.model.transformer.h[0].mlp.c_fc
    expected = c_fc.lora_A["default"].weight.detach().float().numpy().T
    lm = ph.keras_lm(hf_dir)
    import_peft(lm, adapter)
    layer = lm.backbone.transformer_layers[0]._feedforward_intermediate_dense
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.lora_a), expected)

    # The reader for a NumPy without bfloat16 (no ml_dtypes) agrees.
    weights = tmp_path / "adapter_model.safetensors"
    by_hand = peft_format._load_with_bfloat16(os.fspath(weights))
    key = "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"
    np.testing.assert_array_equal(by_hand[key], expected.T)


# --- refusals ---------------------------------------------------------------


def _edit_config(adapter, **changes):
    path = os.path.join(adapter, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _edit_tensors(adapter, edit):
    path = os.path.join(adapter, "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path)


C_ATTN = "base_model.model.transformer.h.0.attn.c_attn"

BAD_ADAPTERS = {
    "unknown_key": (
        lambda a: _edit_tensors(
            a,
            lambda t: t.update(
                {"base_model.model.transformer.wpe.lora_A.weight": np.zeros((2, 16))}
            ),
        ),
        re.escape(
            "does not map onto keras-hub GPT-2: "
            "'base_model.model.transformer.wpe.lora_A.weight'. Supported: "
            "base_model.model.[transformer.]h.{i}.{attn.c_attn, attn.c_proj, "
            "mlp.c_fc, mlp.c_proj}.{lora_A.weight, lora_B.weight, "
            "lora_magnitude_vector}; base_model.model.[transformer.]wte."
            "{lora_embedding_A, lora_embedding_B} (with a tied head, also "
            "base_model.model.{lm_head}.{lora_A.weight, lora_B.weight})."
        ),
    ),
    "mixed_prefixes": (
        lambda a: _edit_tensors(
            a,
            lambda t: t.update(
                {k.replace("transformer.h.1.", "h.1."): t.pop(k) for k in list(t)}
            ),
        ),
        "mixes keys under",
    ),
    "shape_mismatch": (
        lambda a: _edit_tensors(
            a,
            lambda t: t.update(
                {f"{C_ATTN}.lora_B.weight": t[f"{C_ATTN}.lora_B.weight"][:32]}
            ),
        ),
        "Shape mismatch",
    ),
    "rank_mismatch": (lambda a: _edit_config(a, r=3), "Shape mismatch"),
    "missing_lora_b": (
        lambda a: _edit_tensors(a, lambda t: t.pop(f"{C_ATTN}.lora_B.weight")),
        "no lora_B",
    ),
    "block_out_of_range": (
        lambda a: _edit_tensors(
            a,
            lambda t: t.update(
                {k.replace(".h.1.", ".h.7."): t.pop(k) for k in list(t) if ".h.1." in k}
            ),
        ),
        "block 7",
    ),
    "bias": (lambda a: _edit_config(a, bias="all"), "bias"),
    "lora_bias": (lambda a: _edit_config(a, lora_bias=True), "lora_bias"),
    "modules_to_save": (
        lambda a: _edit_config(a, modules_to_save=["lm_head"]),
        "modules_to_save",
    ),
    "pissa": (lambda a: _edit_config(a, init_lora_weights="pissa"), "pissa"),
    "not_lora": (lambda a: _edit_config(a, peft_type="IA3"), "IA3"),
    "other_architecture": (
        lambda a: _edit_config(
            a, auto_mapping={"base_model_class": "LlamaForCausalLM"}
        ),
        "LlamaForCausalLM",
    ),
    "missing_config": (
        lambda a: os.remove(os.path.join(a, "adapter_config.json")),
        "adapter_config.json",
    ),
    "pickle_only": (
        lambda a: os.replace(
            os.path.join(a, "adapter_model.safetensors"),
            os.path.join(a, "adapter_model.bin"),
        ),
        "pickle",
    ),
}


def _assert_unchanged(lm, before):
    assert lora_layers(lm) == []
    after = snapshot(lm)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)
    assert len(lm.trainable_weights) == len(before)


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_import_refuses_and_leaves_model_unchanged(case, hf_dir, tmp_path):
    edit, message = BAD_ADAPTERS[case]
    adapter = peft_adapter(hf_dir, tmp_path, target_modules=["c_attn", "c_fc"], r=2)
    edit(adapter)
    lm = ph.keras_lm(hf_dir)
    before = snapshot(lm)
    with pytest.raises(ValueError, match=message):
        import_peft(lm, adapter)
    _assert_unchanged(lm, before)


def test_import_refuses_a_name_the_model_holds(hf_dir, tmp_path):
    adapter = peft_adapter(hf_dir, tmp_path, target_modules=["c_attn"])
    lm = ph.keras_lm(hf_dir)
    inject_lora(lm, targets=("query",))
    inject_lora(lm, targets=("query",), adapter_name="b")
    before = snapshot(lm)
    for name in ("default", "b"):
        with pytest.raises(ValueError, match=r"holds adapter .*\['default', 'b'\]"):
            import_peft(lm, adapter, adapter_name=name)
    after = snapshot(lm)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)


def test_export_and_import_one_of_several_adapters(hf_dir, ids, base_logits, tmp_path):
    lm = ph.keras_lm(hf_dir)
    inject_lora(lm, rank=2, alpha=4.0, targets=("query", "value"))
    inject_lora(lm, rank=3, alpha=6.0, targets=("query", "attention_output"),
                adapter_name="b")  # fmt: skip
    rng = np.random.default_rng(0)
    for layer in lora_layers(lm):
        for name in layer.adapters.names:
            b = layer.adapters[name].lora_b
            b.assign(rng.normal(0, 0.5, b.shape).astype("float32"))
    logits = {}
    for name in ("default", "b"):
        set_adapter(lm, name)
        logits[name] = ph.keras_outputs(lm, ids)
        assert_adapter_matters(logits[name], base_logits)
        adapter = export_peft(lm, tmp_path / name, adapter_name=name)
        model = peft.PeftModel.from_pretrained(ph.hf_lm(hf_dir), adapter).eval()
        assert_close(ph.torch_outputs(model, ids), logits[name])
    # Into a model holding an adapter, an import adds one beside it.
    fresh = ph.keras_lm(hf_dir)
    import_peft(fresh, tmp_path / "default")
    import_peft(fresh, tmp_path / "b", adapter_name="b")
    assert adapter_names(fresh) == ["default", "b"]
    assert active_adapters(fresh) == ["default"]
    assert_close(ph.keras_outputs(fresh, ids), logits["default"])
    set_adapter(fresh, "b")
    assert_close(ph.keras_outputs(fresh, ids), logits["b"])


def test_import_refuses_other_models(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(
        ValueError, match="supports keras-hub GPT-2, Llama, .* models only"
    ):
        import_peft(model, tmp_path)


def test_export_refuses_different_scales_in_c_attn(hf_dir, tmp_path):
    lm = ph.keras_lm(hf_dir)
    inject_lora(lm, rank=2, alpha=4.0, targets=("query",))
    inject_lora(lm, rank=2, alpha=8.0, targets=("value",))
    with pytest.raises(ValueError, match="scales differ"):
        export_peft(lm, tmp_path)
    assert not os.listdir(tmp_path)


def test_export_refuses_mixed_dropout(hf_dir, tmp_path):
    lm = ph.keras_lm(hf_dir)
    inject_lora(lm, targets=("query", "value"), dropout=0.1)
    inject_lora(lm, targets=("attention_output",))
    with pytest.raises(ValueError, match="lora_dropout"):
        export_peft(lm, tmp_path)


def test_export_refuses_unknown_hf_model(hf_dir, tmp_path):
    lm = ph.keras_lm(hf_dir)
    inject_lora(lm, targets=("query",))
    with pytest.raises(ValueError, match="`hf_model` must be one of"):
        export_peft(lm, tmp_path, hf_model="LlamaForCausalLM")
    assert not os.listdir(tmp_path)


def test_export_refuses_model_without_lora(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="no LoraLayer"):
        export_peft(ph.keras_lm(hf_dir), tmp_path)


def test_export_refuses_other_models(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    inject_lora(model, targets="dense")
    with pytest.raises(
        ValueError, match="supports keras-hub GPT-2, Llama, .* models only"
    ):
        export_peft(model, tmp_path)


def test_merged_gpt2_exports_to_transformers(hf_dir, ids, base_logits, tmp_path):
    lm = ph.keras_lm(hf_dir)
    inject_lora(lm, rank=2, alpha=4.0, targets=GPT2.roles)
    randomize_lora_b(lm, scale=0.5)
    merge_lora(lm)
    expected = ph.keras_outputs(lm, ids)
    assert_adapter_matters(expected, base_logits)
    export_hf_model(lm, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert_close(ph.torch_outputs(model, ids), expected)
