"""[sft] training: `keras-lora sft` on a tiny Llama directory (transformers
weights, the llama3 tokenizer of `sft_fixtures`) writes the adapter, the
PEFT directory and report.json; the PEFT adapter on the transformers model
gives the eval loss the report states."""

from __future__ import annotations

import json
import os

import pytest

from keras_lora.cli import main
from tests import sft_fixtures as fx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_sft_trains_and_peft_gives_the_reported_loss(tmp_path, capsys):
    model = fx.save_tiny_llama(fx.build_model_dir("llama3", str(tmp_path / "llama")))
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES * 2)
    out = str(tmp_path / "out")
    argv = ["sft", "--model", model, "--data", data, "--out", out]
    settings = ["--steps", "4", "--batch", "2", "--learning-rate", "0.02"]
    settings += ["--generate-prompts", "0"]  # tested in test_sft_generate
    assert (
        main([*argv, *settings, "--targets", "query", "value", "attention_output"]) == 0
    )
    assert sorted(set(os.listdir(out)) - {"loss.png"}) == [
        "adapter",
        "checkpoints",
        "peft",
        "report.json",
    ]
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["family"] == "llama"
    assert report["data"]["kept"] == 4 and len(report["train_loss"]) == 4
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert 0.0 <= report["padding_fraction"] < 1.0
    assert "eval loss" in capsys.readouterr().out

    # The same examples, encoded by --inspect, evaluated by transformers.
    assert main([*argv, "--inspect"]) == 0
    with open(os.path.join(out, "encoded.jsonl")) as f:
        encoded = [json.loads(line) for line in f]
    base = transformers.LlamaForCausalLM.from_pretrained(model).eval()
    before = fx.hf_eval_loss(base, encoded)
    assert before == pytest.approx(report["eval_loss_before"], rel=2e-3)
    tuned = peft.PeftModel.from_pretrained(base, os.path.join(out, "peft")).eval()
    after = fx.hf_eval_loss(tuned, encoded)
    assert after == pytest.approx(report["eval_loss_after"], rel=2e-3)
    # The adapter matters: several times the tolerance.
    assert abs(after - before) > 4 * 2e-3 * before


def test_sft_bad_data_writes_nothing(tmp_path, capsys):
    model = fx.build_model_dir("llama3", str(tmp_path / "llama"))
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": 1, "completion": "b"}\n'
    )
    out = tmp_path / "out"
    assert main(["sft", "--model", model, "--data", str(data), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.jsonl line 2: wrong type" in err
    assert not out.exists()
