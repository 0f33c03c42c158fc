"""interop.quantized_load: a Hugging Face checkpoint loaded into a model
whose projections are built quantized equals `from_preset` followed by
`model.quantize`, weight for weight and logit for logit, for every family,
int8 and int4."""

from __future__ import annotations

import os
import warnings

import keras_hub
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import transformers  # noqa: E402

from keras_lora.interop.quantized_load import load_quantized_causal_lm  # noqa: E402
from tests.family_cases import CASES, VOCAB  # noqa: E402
from tests.helpers import to_numpy  # noqa: E402
from tests.peft_helpers import save_tiny_model  # noqa: E402

HF_CASES = [case for case in CASES if case.hf_config is not None]


def _save_tiny_gpt2(path) -> str:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return os.fspath(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """family id -> a tiny Hugging Face directory, saved once per module."""
    saved = {}

    def model_dir(family: str) -> str:
        if family not in saved:
            path = tmp_path_factory.mktemp(family)
            if family == "gpt2":
                saved[family] = _save_tiny_gpt2(path)
            else:
                (case,) = [c for c in HF_CASES if c.id == family]
                saved[family] = save_tiny_model(case, path)
        return saved[family]

    return model_dir


def _quantized_after_float_load(model_dir: str, mode: str):
    lm = keras_hub.models.CausalLM.from_preset(model_dir, preprocessor=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Layer .* does not have a `quantize`")
        lm.quantize(mode)
    return lm


FAMILIES = ["gpt2", *(c.id for c in HF_CASES)]
# int4 on GPT-2 (EinsumDense and Dense, tied head), Llama (untied head) and
# Gemma (head-major kernels): the mode's own packing on every layout; the
# mapping of tensors to layers, the same for both modes, on every family.
LOADS = [(f, "int8") for f in FAMILIES] + [
    (f, "int4") for f in ("gpt2", "llama", "gemma")
]


@pytest.mark.parametrize("family, mode", LOADS)
def test_built_quantized_load_equals_quantize_after_load(model_dirs, family, mode):
    model_dir = model_dirs(family)
    want = _quantized_after_float_load(model_dir, mode)
    got = load_quantized_causal_lm(model_dir, mode)
    want_weights = {v.path: to_numpy(v) for v in want.weights}
    got_weights = {v.path: to_numpy(v) for v in got.weights}
    assert sorted(got_weights) == sorted(want_weights)
    for path, value in want_weights.items():
        np.testing.assert_array_equal(got_weights[path], value, err_msg=path)
    quantized = [
        layer.path
        for layer in got.backbone._flatten_layers()
        if getattr(layer, "quantization_mode", None) == mode
    ]
    assert any(path.endswith("token_embedding") for path in quantized)
    assert len(quantized) > 2 * 4  # Every projection of both blocks.
    ids = np.arange(1, 13, dtype="int32").reshape(2, 6) % VOCAB
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_array_equal(to_numpy(got(x)), to_numpy(want(x)))


def test_bad_mode_and_unknown_architecture_are_refused(tmp_path):
    with pytest.raises(ValueError, match="choose int8 or int4"):
        load_quantized_causal_lm(str(tmp_path), "float8")
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(ValueError, match=r"\['BertModel'\], of no family"):
        load_quantized_causal_lm(str(tmp_path), "int8")


def test_sft_loads_a_hugging_face_directory_built_quantized(model_dirs, monkeypatch):
    from keras_lora.recipes.sft import run

    model_dir = model_dirs("llama")
    calls = []

    def record(path, mode):
        calls.append((path, mode))
        return load_quantized_causal_lm(path, mode)

    monkeypatch.setattr(run, "load_quantized_causal_lm", record)
    lm = run.load_causal_lm(model_dir, "int4")
    assert calls == [(model_dir, "int4")]
    assert lm.backbone.get_layer("token_embedding").quantization_mode == "int4"
    assert (
        run.load_causal_lm(model_dir).backbone.token_embedding.quantization_mode is None
    )


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    from tests import sft_presets

    root = tmp_path_factory.mktemp("presets")
    return {
        family: sft_presets.build_preset(family, str(root / family))
        for family in sft_presets.PRESET_FAMILIES
    }


@pytest.mark.parametrize(
    "family, mode", [("llama3", "int8"), ("gemma", "int8"), ("llama3", "int4")]
)
def test_preset_built_quantized_equals_quantize_after_load(
    presets, family, mode, monkeypatch
):
    from keras_lora.interop import quantized_load
    from keras_lora.interop.quantized_load import load_quantized_preset
    from keras_lora.recipes.sft.run import load_causal_lm

    filled = []

    def fill_quantized(layer, kernel):
        filled.append(layer.path)
        return original(layer, kernel)

    original = quantized_load.fill_quantized
    monkeypatch.setattr(quantized_load, "fill_quantized", fill_quantized)
    want = _quantized_after_float_load(presets[family], mode)
    got = load_causal_lm(presets[family], mode)
    # Every projection of both blocks filled from its saved float kernel.
    assert len(filled) == 2 * 7 and len(set(filled)) == 14
    assert sorted(v.path for v in got.weights) == sorted(v.path for v in want.weights)
    want_weights = {v.path: to_numpy(v) for v in want.weights}
    for variable in got.weights:
        np.testing.assert_array_equal(
            to_numpy(variable), want_weights[variable.path], err_msg=variable.path
        )
    with pytest.raises(ValueError, match="choose int8 or int4"):
        load_quantized_preset(presets[family], "float8")
