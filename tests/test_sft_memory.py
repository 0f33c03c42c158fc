"""[sft] memory budget and scale-out: `--chunked-loss`, `--remat`,
`--quantize` and `--distribution` give the plain run's losses on a tiny
Llama directory (distribution: 8 virtual JAX devices in a subprocess,
tests/sft_dist_worker.py; a clear error on the other backends)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import pytest

from keras_lora.cli import main
from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.run import train
from tests import sft_fixtures as fx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sft_dist_worker.py")
# Generations are tested in test_sft_generate.
OPTIONS = {"steps": 3, "batch": 2, "learning_rate": 0.01, "generate_prompts": 0}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[str, str]:
    """(model directory, training data) of a tiny Llama."""
    root = tmp_path_factory.mktemp("sft-memory")
    model = fx.save_tiny_llama(fx.build_model_dir("llama3", str(root / "llama")))
    data = fx.write_jsonl(str(root / "train.jsonl"), fx.MESSAGES * 2)
    return model, data


@pytest.fixture(scope="module")
def plain(llama, tmp_path_factory) -> dict:
    model, data = llama
    out = str(tmp_path_factory.mktemp("plain") / "out")
    return train(SftConfig(model, data, out, **OPTIONS))


def _losses(report: dict) -> list[float]:
    return [
        *report["train_loss"],
        report["eval_loss_before"],
        report["eval_loss_after"],
    ]


def test_chunked_loss_and_remat_give_the_plain_losses(llama, plain, tmp_path):
    model, data = llama
    out = str(tmp_path / "out")
    argv = ["sft", "--model", model, "--data", data, "--out", out]
    flags = ["--steps", "3", "--batch", "2", "--learning-rate", "0.01"]
    flags += ["--generate-prompts", "0"]
    # --chunked-loss without a count: 8 pieces (on JAX, a scan over them).
    assert main([*argv, *flags, "--chunked-loss", "--remat"]) == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["settings"]["chunked_loss"] == 8
    assert report["settings"]["remat"] is True
    assert _losses(report) == pytest.approx(_losses(plain), rel=1e-5, abs=1e-6)
    assert plain["eval_loss_after"] < plain["eval_loss_before"]


def test_int8_base_trains_close_to_float_and_exports_peft(llama, plain, tmp_path):
    model, data = llama
    out = str(tmp_path / "out")
    report = train(SftConfig(model, data, out, quantize="int8", **OPTIONS))
    assert report["settings"]["quantize"] == "int8"
    assert _losses(report) == pytest.approx(_losses(plain), rel=2e-3)
    assert report["eval_loss_after"] < report["eval_loss_before"] - 1e-3
    # The adapter is float and made for the float base: transformers + PEFT
    # load it there and evaluate near the int8 run's loss.
    with open(os.path.join(out, "peft", "adapter_config.json")) as f:
        assert json.load(f)["r"] == 8
    assert (
        main(["sft", "--model", model, "--data", data, "--out", out, "--inspect"]) == 0
    )
    with open(os.path.join(out, "encoded.jsonl")) as f:
        encoded = [json.loads(line) for line in f]
    base = transformers.LlamaForCausalLM.from_pretrained(model).eval()
    tuned = peft.PeftModel.from_pretrained(base, os.path.join(out, "peft")).eval()
    assert fx.hf_eval_loss(tuned, encoded) == pytest.approx(
        report["eval_loss_after"], rel=2e-3
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"quantize": "int3"}, "quantize must be one of int8, int4"),
        ({"quantize": "int4", "use_dora": True}, "drop --use-dora or --quantize"),
        ({"quantize": "int8", "init": "pissa"}, "use --init kaiming or gaussian"),
        ({"chunked_loss": 0}, "chunked_loss must be at least 1"),
        ({"distribution": "pipeline"}, "distribution must be one of data, model"),
    ],
)
def test_config_rejects_bad_memory_options(options, message):
    with pytest.raises(ValueError, match=message):
        SftConfig("m", "d.jsonl", "o", **options)


def test_distribution_needs_jax(tmp_path, capsys):
    if keras.backend.backend() == "jax":
        config = SftConfig("m", "d.jsonl", "o", distribution="data")
        assert config.distribution == "data"
        with pytest.raises(ValueError, match="drop --quantize or --distribution"):
            SftConfig("m", "d.jsonl", "o", distribution="model", quantize="int8")
        return
    with pytest.raises(ValueError, match="needs the JAX backend.*KERAS_BACKEND=jax"):
        SftConfig("m", "d.jsonl", "o", distribution="data")
    out = tmp_path / "out"
    argv = ["sft", "--model", "m", "--data", "d", "--out", str(out)]
    assert main([*argv, "--distribution", "model"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("keras-lora: error: --distribution runs")
    assert "needs the JAX backend" in line and "KERAS_BACKEND=jax" in line
    assert not out.exists()


@pytest.mark.worker_backend("jax", judged_in="torch")
def test_distribution_gives_the_single_device_losses(llama, tmp_path):
    pytest.importorskip("jax")
    model, data = llama
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="jax")
    done = subprocess.run(
        [sys.executable, WORKER, model, data, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["devices"] == 8
    single = _losses(run["single"])
    for name in ("data", "model"):
        assert run[name]["settings"]["distribution"] == name
        assert _losses(run[name]) == pytest.approx(single, rel=1e-5)
    assert single[-1] < single[-2]  # It trains.
    # 8 devices, batch 6: refused before anything is written.
    assert run["batch_error"] == (
        "--batch 6 does not split over the 8 data-parallel replicas of "
        "--distribution data (8 devices, model axis 1): give a multiple of 8"
    )
    assert run["bad_out_exists"] is False
