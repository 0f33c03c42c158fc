"""[sft] `--targets` with the token embedding: GPT-2 (the output head tied
to it) and Llama (untied) train it beside all-linear or the default roles,
and the exported PEFT adapter gives the reported eval loss in transformers;
families whose PEFT export cannot hold it, and settings the embedding
refuses, fail before training."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.numpy

from keras_lora.cli import main
from keras_lora.families import GPT2, LLAMA, QWEN2
from keras_lora.recipes.sft.config import SftConfig, check_family_targets
from tests import sft_fixtures as fx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# (family, fixture, transformers class, targets, adapted layers: 2 blocks)
CASES = {
    "gpt2": (
        fx.save_tiny_gpt2,
        "GPT2LMHeadModel",
        ("query", "value", "token_embedding"),
        2 * 2 + 1,
    ),
    "llama": (
        fx.save_tiny_llama,
        "LlamaForCausalLM",
        ("all-linear", "token_embedding"),
        2 * 7 + 1,
    ),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_token_embedding_trains_and_peft_gives_the_reported_loss(family, tmp_path):
    save, hf_class, targets, adapted = CASES[family]
    model = save(fx.build_model_dir("llama3", str(tmp_path / family)))
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES * 2)
    out = str(tmp_path / "out")
    argv = ["sft", "--model", model, "--data", data, "--out", out]
    settings = ["--steps", "4", "--batch", "2", "--learning-rate", "0.02"]
    settings += ["--generate-prompts", "0"]  # tested in test_sft_generate
    merged = str(tmp_path / "merged")
    if family == "gpt2":  # keras-lora's merge of the tied table and head.
        settings += ["--merged-hf", merged]
    assert main([*argv, *settings, "--targets", *targets]) == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["family"] == family
    assert report["settings"]["targets"] == list(targets)
    assert report["settings"]["adapted_layers"] == adapted
    assert report["eval_loss_after"] < report["eval_loss_before"]

    peft_dir = os.path.join(out, "peft")
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        config = json.load(f)
    embedding = {"gpt2": "wte", "llama": "embed_tokens"}[family]
    assert embedding in {m.rpartition(".")[2] for m in config["target_modules"]}
    tensors = safetensors.numpy.load_file(
        os.path.join(peft_dir, "adapter_model.safetensors")
    )
    # The embedding's A starts at zero (PEFT's start): training moved it.
    (table_a,) = [v for k, v in tensors.items() if "lora_embedding_A" in k]
    assert abs(table_a).max() > 0
    if family == "gpt2":  # The tied head's factors are the embedding's.
        assert config["ensure_weight_tying"] is True
        assert "lm_head" in config["target_modules"]
    else:  # Every trained weight, once.
        trained = sum(t.size for t in tensors.values())
        assert trained == report["settings"]["trainable_params"]

    assert main([*argv, "--inspect"]) == 0
    with open(os.path.join(out, "encoded.jsonl")) as f:
        encoded = [json.loads(line) for line in f]
    base = getattr(transformers, hf_class).from_pretrained(model).eval()
    before = fx.hf_eval_loss(base, encoded)
    assert before == pytest.approx(report["eval_loss_before"], rel=2e-3)
    tuned = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    after = fx.hf_eval_loss(tuned, encoded)
    assert after == pytest.approx(report["eval_loss_after"], rel=2e-3)
    assert abs(after - before) > 4 * 2e-3 * before
    if family == "gpt2":
        tied = transformers.GPT2LMHeadModel.from_pretrained(merged).eval()
        assert fx.hf_eval_loss(tied, encoded) == pytest.approx(after, rel=2e-3)


def test_a_family_without_peft_embedding_exchange_is_refused_before_training(
    tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["sft", "--model", str(tmp_path / "m"), "--data", "d.jsonl"]
    config = SftConfig("m", "d.jsonl", str(out), targets=("token_embedding",))
    with pytest.raises(ValueError, match="drop token_embedding from --targets"):
        check_family_targets(config, QWEN2)
    assert check_family_targets(config, LLAMA) == ("token_embedding",)
    assert check_family_targets(SftConfig("m", "d", "o"), GPT2) == GPT2.default_targets
    # Through the command: the Qwen2 model loads, nothing is written.
    model = fx.save_tiny_qwen2(fx.build_model_dir("qwen2", str(tmp_path / "m")))
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES)
    argv = ["sft", "--model", model, "--data", data, "--out", str(out)]
    assert main([*argv, "--targets", "query", "token_embedding"]) == 1
    err = capsys.readouterr().err
    assert "OUT/peft cannot hold it" in err and "not for Qwen2" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"use_dora": True}, "--use-dora"),
        ({"init": "pissa"}, "--init pissa"),
        ({"quantize": "int8"}, "--quantize int8"),
    ],
)
def test_settings_the_embedding_refuses(options, flag):
    targets = ("all-linear", "token_embedding")
    config = SftConfig("m", "d.jsonl", "o", targets=targets, **options)
    with pytest.raises(ValueError, match=f"does not combine with {flag}"):
        check_family_targets(config, GPT2)
    # Without the embedding the same settings pass.
    plain = SftConfig("m", "d.jsonl", "o", targets=("all-linear",), **options)
    assert check_family_targets(plain, GPT2) == ("all-linear",)
