"""Embedding LoRA exchanged with real PEFT: GPT-2's `wte` (tied to the LM
head) and Llama's `embed_tokens` (untied), both directions, logits 1e-4."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import peft  # noqa: E402
import safetensors.numpy  # noqa: E402

from keras_lora import (  # noqa: E402
    LoraEmbedding,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from keras_lora.families import LLAMA  # noqa: E402
from keras_lora.interop import export_peft, import_peft  # noqa: E402
from tests import peft_helpers  # noqa: E402
from tests.family_cases import CASES  # noqa: E402
from tests.helpers import snapshot  # noqa: E402
from tests.peft_helpers import Side, save_tiny_model  # noqa: E402

ATOL = 1e-4
TARGETS = ("query", "value", "token_embedding")


def randomize(model, scale=0.2, seed=0):
    """Every factor of every LoRA layer non-zero (a fresh embedding A is 0)."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        for factor in (layer.lora_a, layer.lora_b):
            shape = tuple(factor.shape)
            factor.assign(rng.normal(0, scale, shape).astype("float32"))


def randomize_peft_embedding(embedding, scale=0.2):
    torch.manual_seed(2)
    with torch.no_grad():
        for factors in (embedding.lora_embedding_A, embedding.lora_embedding_B):
            factors["default"].copy_(scale * torch.randn_like(factors["default"]))


def assert_same_and_adapted(actual, expected, base):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)
    assert np.max(np.abs(expected - base)) > 100 * ATOL


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return peft_helpers.save_hf_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    case = next(c for c in CASES if c.family is LLAMA)
    return Side(case, save_tiny_model(case, tmp_path_factory.mktemp("llama")))


def test_gpt2_export_ties_the_head_and_matches_peft(gpt2_dir, tmp_path):
    ids = peft_helpers.token_ids()
    base = peft_helpers.torch_outputs(peft_helpers.hf_lm(gpt2_dir), ids)
    lm = peft_helpers.keras_lm(gpt2_dir)
    inject_lora(lm, rank=4, alpha=8.0, targets=TARGETS)
    randomize(lm)
    expected = peft_helpers.keras_outputs(lm, ids)

    export_peft(lm, tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["ensure_weight_tying"] is True
    assert {"wte", "lm_head"} <= set(config["target_modules"])
    keys = safetensors.numpy.load_file(
        os.path.join(tmp_path, "adapter_model.safetensors")
    )
    emb_a = keys["base_model.model.transformer.wte.lora_embedding_A"]
    assert emb_a.shape == (4, 96)
    np.testing.assert_array_equal(
        keys["base_model.model.lm_head.lora_B.weight"], emb_a.T
    )

    model = peft.PeftModel.from_pretrained(peft_helpers.hf_lm(gpt2_dir), tmp_path)
    actual = peft_helpers.torch_outputs(model.eval(), ids)
    assert_same_and_adapted(actual, expected, base)


def test_gpt2_import_of_a_tied_peft_adapter(gpt2_dir, tmp_path):
    ids = peft_helpers.token_ids()
    hf = peft_helpers.hf_lm(gpt2_dir)
    base = peft_helpers.torch_outputs(hf, ids)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "wte", "lm_head"],
        ensure_weight_tying=True,
    )
    model = peft.get_peft_model(hf, config).eval()
    randomize_peft_embedding(model.base_model.model.transformer.wte)
    expected = peft_helpers.torch_outputs(model, ids)
    model.save_pretrained(tmp_path)

    lm = import_peft(peft_helpers.keras_lm(gpt2_dir), tmp_path)
    emb = lm.backbone.token_embedding
    assert isinstance(emb, LoraEmbedding) and emb.tied and emb.rank == 4
    assert_same_and_adapted(peft_helpers.keras_outputs(lm, ids), expected, base)


def test_gpt2_lookup_only_peft_adapter(gpt2_dir, tmp_path):
    # PEFT without the head targeted adapts the lookup only, tied head or
    # not: the import computes the same (`adapt_head=False`), exports it
    # back the same way, and refuses to merge (the head would move).
    ids = peft_helpers.token_ids()
    model = peft.get_peft_model(
        peft_helpers.hf_lm(gpt2_dir), peft.LoraConfig(target_modules=["wte"])
    ).eval()
    randomize_peft_embedding(model.base_model.model.transformer.wte)
    expected = peft_helpers.torch_outputs(model, ids)
    model.save_pretrained(tmp_path / "peft")
    base = peft_helpers.torch_outputs(peft_helpers.hf_lm(gpt2_dir), ids)

    lm = import_peft(peft_helpers.keras_lm(gpt2_dir), tmp_path / "peft")
    emb = lm.backbone.token_embedding
    assert emb.tied and not emb.adapt_head
    assert_same_and_adapted(peft_helpers.keras_outputs(lm, ids), expected, base)

    before = snapshot(lm)
    with pytest.raises(ValueError, match="adapt_head=False"):
        merge_lora(lm)
    assert isinstance(lm.backbone.token_embedding, LoraEmbedding)
    assert all(np.array_equal(v, snapshot(lm)[k]) for k, v in before.items())

    other = peft_helpers.keras_lm(gpt2_dir)
    load_adapter(other, save_adapter(lm, tmp_path / "keras"))
    assert not other.backbone.token_embedding.adapt_head
    np.testing.assert_allclose(
        peft_helpers.keras_outputs(other, ids), expected, rtol=0, atol=ATOL
    )

    export_peft(lm, tmp_path / "back")
    with open(os.path.join(tmp_path / "back", "adapter_config.json")) as f:
        assert json.load(f)["target_modules"] == ["wte"]
    back = peft.PeftModel.from_pretrained(
        peft_helpers.hf_lm(gpt2_dir), tmp_path / "back"
    )
    actual = peft_helpers.torch_outputs(back.eval(), ids)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)


def test_llama_export_matches_peft(llama, tmp_path):
    lm = llama.keras_lm()
    inject_lora(lm, rank=3, alpha=6.0, targets=TARGETS)
    assert not lm.backbone.token_embedding.tied  # Untied head: lookup only.
    randomize(lm)
    expected = llama.keras_logits(lm)
    export_peft(lm, tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        config = json.load(f)
    assert "embed_tokens" in config["target_modules"]
    assert "lm_head" not in config["target_modules"]
    model = peft.PeftModel.from_pretrained(llama.hf_model(), tmp_path).eval()
    assert_same_and_adapted(llama.hf_logits(model), expected, llama.hf_base)


def test_llama_import_matches_peft(llama, tmp_path):
    config = peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["q_proj", "embed_tokens"]
    )
    model = peft.get_peft_model(llama.hf_model(), config).eval()
    randomize_peft_embedding(model.base_model.model.model.embed_tokens)
    expected = llama.hf_logits(model)
    model.save_pretrained(tmp_path)
    lm = import_peft(llama.keras_lm(), tmp_path)
    assert isinstance(lm.backbone.token_embedding, LoraEmbedding)
    assert_same_and_adapted(llama.keras_logits(lm), expected, llama.hf_base)
