"""[sft] training options: DoRA, the LoRA init, all-linear targets, the
optimizer, --epochs, --eval-every and OUT/loss.png, on a tiny Llama
directory; the PEFT adapters reproduce the reported losses in
transformers."""

from __future__ import annotations

import json
import os
import sys

import pytest
import safetensors.numpy

from keras_lora.cli import main
from keras_lora.recipes.sft.config import SftConfig
from tests import sft_fixtures as fx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The Llama family's Hugging Face names of every linear layer but lm_head.
ALL_LINEAR = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sft") / "llama")
    return fx.save_tiny_llama(fx.build_model_dir("llama3", path))


def run_sft(llama, tmp_path, *flags: str) -> tuple[str, dict, list[dict]]:
    """Train with `flags` (4 examples), then --inspect the same data; returns
    (OUT, report, encoded examples)."""
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES * 2)
    out = str(tmp_path / "out")
    argv = ["sft", "--model", llama, "--data", data, "--out", out]
    off = ["--generate-prompts", "0"]  # tested in test_sft_generate
    assert main([*argv, "--learning-rate", "0.01", *off, *flags]) == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert main([*argv, "--inspect"]) == 0
    with open(os.path.join(out, "encoded.jsonl")) as f:
        encoded = [json.loads(line) for line in f]
    return out, report, encoded


def peft_loss(llama: str, out: str, encoded: list[dict]) -> float:
    """The eval loss of OUT/peft on the transformers model."""
    base = transformers.LlamaForCausalLM.from_pretrained(llama).eval()
    tuned = peft.PeftModel.from_pretrained(base, os.path.join(out, "peft")).eval()
    return fx.hf_eval_loss(tuned, encoded)


def test_dora_all_linear_eval_every_and_loss_png(llama, tmp_path):
    out, report, encoded = run_sft(
        llama,
        tmp_path,
        *("--use-dora", "--init", "gaussian", "--targets", "all-linear"),
        *("--steps", "4", "--batch", "2", "--eval-every", "2"),
    )
    settings = report["settings"]
    assert settings["use_dora"] is True and settings["init"] == "gaussian"
    assert settings["targets"] == ["all-linear"] and settings["eval_every"] == 2
    with open(os.path.join(out, "peft", "adapter_config.json")) as f:
        config = json.load(f)
    assert config["use_dora"] is True
    names = {name.rpartition(".")[2] for name in config["target_modules"]}
    assert names == ALL_LINEAR
    # 2 blocks x 7 linear layers; the PEFT file holds every trained weight
    # (A, B and DoRA's magnitude): 2 x 2176 at rank 8.
    assert settings["adapted_layers"] == 14
    tensors = safetensors.numpy.load_file(
        os.path.join(out, "peft", "adapter_model.safetensors")
    )
    assert sum(t.size for t in tensors.values()) == settings["trainable_params"]
    assert settings["trainable_params"] == 4352
    assert sum("magnitude" in name for name in tensors) == 14
    after = peft_loss(llama, out, encoded)
    assert after == pytest.approx(report["eval_loss_after"], rel=2e-3)
    assert report["eval_loss_after"] < report["eval_loss_before"]

    # Evaluated after steps 2 and 4: the last point is the final model.
    steps = [step for step, _ in report["eval_loss_every"]]
    assert steps == [2, 4] and len(report["train_loss"]) == 4
    last = report["eval_loss_every"][-1][1]
    assert last == pytest.approx(report["eval_loss_after"], rel=1e-4)
    assert report["eval_loss_every"][0][1] != pytest.approx(last, rel=1e-3)

    pytest.importorskip("matplotlib")
    assert report["loss_plot"] == "loss.png" and report["notes"] == []
    with open(os.path.join(out, "loss.png"), "rb") as f:
        png = f.read()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_epochs_sgd_olora_without_matplotlib(llama, tmp_path, monkeypatch):
    # None in sys.modules makes `import matplotlib` fail as if not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    # An earlier run's chart must not pass for this run's.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "loss.png").write_bytes(PNG_MAGIC)
    out, report, encoded = run_sft(
        llama,
        tmp_path,
        *("--epochs", "2", "--batch", "3", "--optimizer", "sgd", "--init", "olora"),
        *("--targets", "query", "value"),
    )
    # 4 examples, 3 a batch: ceil(4 / 3) = 2 steps a pass, 2 passes.
    assert report["steps"] == 4 and len(report["train_loss"]) == 4
    assert report["epochs"] == 2 and report["eval_loss_every"] == []
    assert report["settings"]["optimizer"] == "sgd"
    assert report["settings"]["init"] == "olora"
    # OLoRA moved part of each kernel into the factors; the PEFT export is
    # for the original base and gives the same loss there.
    after = peft_loss(llama, out, encoded)
    assert after == pytest.approx(report["eval_loss_after"], rel=2e-3)
    assert report["eval_loss_after"] < report["eval_loss_before"]

    assert "loss.png" not in os.listdir(out) and report["loss_plot"] is None
    (note,) = report["notes"]
    assert note.startswith("no loss.png:") and "keras-lora[bench]" in note
    assert "\n" not in note


def test_steps_and_epochs_are_exclusive(tmp_path, capsys):
    argv = ["sft", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--steps", "3", "--epochs", "1"])
    assert exit_.value.code == 2
    assert "not allowed with argument --steps" in capsys.readouterr().err
    with pytest.raises(ValueError, match="either steps or epochs"):
        SftConfig("m", "d.jsonl", "o", steps=3, epochs=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": "adam"}, "optimizer must be one of adamw, sgd"),
        ({"init": "loftq"}, "Unknown `init` 'loftq'"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"eval_every": 0}, "eval_every must be at least 1"),
        ({"targets": ()}, "targets must name at least one"),
    ],
)
def test_config_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        SftConfig("m", "d.jsonl", "o", **options)


def test_config_step_count():
    config = SftConfig("m", "d.jsonl", "o", batch=4)
    assert config.total_steps(100) == 20  # Neither steps nor epochs.
    assert SftConfig("m", "d.jsonl", "o", steps=7).total_steps(100) == 7
    epochs = SftConfig("m", "d.jsonl", "o", batch=4, epochs=3)
    assert [epochs.total_steps(n) for n in (1, 4, 5, 8)] == [3, 3, 6, 6]


def test_cli_rejects_a_bad_init(tmp_path, capsys):
    argv = ["sft", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--init", "loftq"])
    assert exit_.value.code == 2
    assert "Unknown `init` 'loftq'" in capsys.readouterr().err
