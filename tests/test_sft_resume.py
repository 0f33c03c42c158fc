"""[sft] checkpoints and --resume: a run interrupted after 2 of 4 steps and
resumed gives the losses, evaluations and final adapter of an uninterrupted
run (LoRA dropout on); resuming with other settings or without a
checkpoint is refused with a message that names the problem; the progress
lines of a run whose output is not a terminal."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import safetensors.numpy

from keras_lora.cli import main
from keras_lora.recipes import training
from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.resume import run_settings
from keras_lora.recipes.sft.run import train
from tests import sft_fixtures as fx

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sft") / "llama")
    return fx.save_tiny_llama(fx.build_model_dir("llama3", path))


def adapter_tensors(out: str) -> dict:
    """The factors of OUT/adapter."""
    (path,) = glob.glob(os.path.join(out, "adapter", "adapter_weights.*"))
    return safetensors.numpy.load_file(path)


def test_resume_equals_an_uninterrupted_run(llama, tmp_path, monkeypatch, capsys):
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES * 3)

    def config(out: str, **changes) -> SftConfig:
        settings = dict(
            model=llama,
            data=data,
            out=str(tmp_path / out),
            steps=4,
            batch=2,
            learning_rate=0.01,
            dropout=0.25,
            eval_every=3,
            checkpoint_every=2,
            quiet=True,
            generate_prompts=0,
        )
        return SftConfig(**(settings | changes))

    whole = train(config("whole", quiet=False))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[:2] for line in lines] == [
        [f"step {step}/4", f"loss {loss:.4f}"]
        for step, loss in enumerate(whole["train_loss"], 1)
    ]

    # An interruption as the third step begins, after step 2's checkpoint.
    begin = training.StepLog.on_train_batch_begin

    def interrupted(self, batch, logs=None):
        if len(self.losses) == 2:
            raise KeyboardInterrupt
        begin(self, batch, logs)

    monkeypatch.setattr(training.StepLog, "on_train_batch_begin", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config("cut"))
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert sorted(os.listdir(cut)) == ["checkpoints"]  # No adapter, no report.
    assert os.listdir(cut / "checkpoints") == ["step-00000002"]
    resumed = train(config("cut", resume=True))

    assert resumed["resumed_from"].endswith("step-00000002")
    assert len(resumed["train_loss"]) == 4
    np.testing.assert_allclose(resumed["train_loss"], whole["train_loss"], rtol=1e-6)
    assert resumed["eval_loss_every"][0][0] == 3
    np.testing.assert_allclose(
        resumed["eval_loss_every"], whole["eval_loss_every"], rtol=1e-6
    )
    assert resumed["eval_loss_before"] == whole["eval_loss_before"]
    assert resumed["eval_loss_after"] == pytest.approx(
        whole["eval_loss_after"], rel=1e-6
    )
    expected, got = adapter_tensors(str(tmp_path / "whole")), adapter_tensors(str(cut))
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7)
    # The steps after the checkpoint moved the factors: the check has teeth.
    step2 = cut / "checkpoints" / "step-00000002"
    (step2,) = glob.glob(str(step2 / "adapter_weights.*"))
    # (`keep` = 2: the run's end added step 4 beside step 2.)
    assert sorted(os.listdir(cut / "checkpoints")) == [
        "step-00000002",
        "step-00000004",
    ]
    early = safetensors.numpy.load_file(step2)
    assert max(float(np.abs(early[n] - expected[n]).max()) for n in expected) > 1e-4


def test_resume_refusals(llama, tmp_path, capsys):
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES * 2)
    out = str(tmp_path / "out")
    argv = ["sft", "--model", llama, "--data", data, "--out", out, "--resume"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--resume: no checkpoint in {out}/checkpoints" in err
    assert not os.path.exists(out)

    # The record of a checkpoint after 2 steps (refusals are decided before
    # any weight is read).
    config = SftConfig(model=llama, data=data, out=out, batch=2, steps=2)
    checkpoint = os.path.join(out, "checkpoints", "step-00000002")
    os.makedirs(checkpoint)
    with open(os.path.join(checkpoint, "run.json"), "w") as f:
        json.dump(
            {
                "step": 2,
                "settings": run_settings(config),
                "train_loss": [1.0, 1.0],
                "eval_loss_before": 1.0,
                "eval_loss_every": [],
            },
            f,
        )
    argv += ["--batch", "2"]
    assert main([*argv, "--rank", "4"]) == 1
    err = capsys.readouterr().err
    assert "--resume: --rank is 4 here, 8 in the checkpoint" in err
    assert main([*argv, "--steps", "1"]) == 1
    assert "holds 2 steps, more than this run's 1" in capsys.readouterr().err
    with open(data, "a") as f:
        f.write(json.dumps(fx.MESSAGES[0]) + "\n")
    assert main(argv) == 1
    assert "--resume: data has changed since the checkpoint" in capsys.readouterr().err
