"""The package as a user installs it: a wheel, run from an empty directory.

The wheel is built from a copy of this checkout (so no build files land in
it) and installed with `pip install --target` (the dependencies are on this
machine already); the commands then run with only that directory on
PYTHONPATH, from a directory outside the checkout, so neither the checkout
nor an editable install can be what runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from keras_lora.cli import main
from tests.helpers import DEMO_BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What these tests check is the install, not a backend: the children run
# JAX (KERAS_BACKEND set for them) once per suite, judged in the torch pass
# (tests/conftest.py): the JAX pass is the slowest, the torch pass the
# lightest.
pytestmark = pytest.mark.worker_backend(DEMO_BACKEND, judged_in="torch")
# The demo's smallest settings: 2 quality steps, one timed step per run.
SMALL_DEMO = [
    "--compare-steps", "1", "--warmup", "1", "--eval-batches", "1",
    "--inference-runs", "1", "--batch", "2", "--seq", "16", "--runs", "full",
    "lora", "--quality-steps", "2", "--quality-batch", "2",
    "--quality-seq", "16", "--quality-eval-rows", "2", "--quality-max-length",
    "8",
]  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> str:
    """A directory holding keras_lora installed from a freshly built wheel."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    shutil.copytree(
        os.path.join(ROOT, "keras_lora"),
        source / "keras_lora",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    dist, site = root / "dist", root / "site"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, source],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("keras_lora-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", site, wheel],
        check=True,
        timeout=300,
    )
    return str(site)


def run_installed(site: str, args: list[str], cwd, timeout: float = 600):
    """Run the installed `keras-lora` script from `cwd`, `site` on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=site, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=DEMO_BACKEND)
    return subprocess.run(
        [os.path.join(site, "bin", "keras-lora"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_installed_package_comes_from_the_wheel(site, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=site, KERAS_BACKEND=DEMO_BACKEND)
    code = "import keras_lora.bench.worker as w, keras_lora; print(keras_lora.__file__)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = proc.stdout.strip().splitlines()[-1]
    assert path == os.path.join(site, "keras_lora", "__init__.py")

    proc = run_installed(site, ["compare", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--backend" in proc.stdout and "--tokens" in proc.stdout
    proc = run_installed(site, ["demo", "--arch", "huge"], tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'huge'" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_installed_demo_runs_from_an_empty_directory(site, tmp_path):
    proc = run_installed(
        site, ["demo", "--arch", "tiny", "--out", "d", *SMALL_DEMO], tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "d"
    with open(out / "compare" / "results.json") as f:
        compare = json.load(f)
    results = {r["run"]: r for r in compare["results"]}
    assert sorted(results) == ["full", "lora"]
    for result in results.values():
        assert result["status"] == "ok" and result["backend"] == DEMO_BACKEND
        # The worker processes ran the installed code too.
        assert result["keras_lora_path"] == os.path.join(site, "keras_lora")
        assert 0 < result["eval_loss"] < 10
    assert results["lora"]["trainable_params"] == 2048  # 2 x (q, v) x 512.
    assert results["full"]["trainable_params"] == 1280 * 64 + 2 * 33_472 + 128
    page = (out / "report.md").read_text()
    assert page.startswith("# keras-lora demo")
    assert "| full fine-tuning |" in page and "| keras-lora |" in page
    assert "RANDOM weights" in page
    # The quality part ran on the pretrained base shipped inside the wheel.
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["runs"]) == {"lora", "full"}
    assert page.index("## Quality") < page.index("## Cost")
    assert "keras-lora's own small GPT-2" in page and "source code" in page
    for name in ("quality_loss.png", "quality_adapter"):
        assert (out / name).exists(), name
    rows = np.load(out / "compare" / "tokens.npy")
    assert rows.shape == (6, 17) and rows.max() < 1024  # (1 + 1 + 1) x 2 rows.
    assert compare["config"]["data"].startswith("token ids from")
    assert "| held-out loss |" in proc.stdout and "demo finished in" in proc.stdout


def test_installed_sft_inspects_and_trains_from_outside_the_checkout(site, tmp_path):
    pytest.importorskip("tokenizers")
    from tests import sft_fixtures as fx

    run = tmp_path / "run"
    run.mkdir()
    proc = run_installed(site, ["sft", "--help"], run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--inspect" in proc.stdout and "--use-dora" in proc.stdout
    assert os.listdir(run) == []

    # The tiny model directory and data are built here, outside `run`.
    model = fx.build_model_dir("llama3", str(tmp_path / "llama"))
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES)
    flags = ["--model", model, "--data", data, "--inspect"]
    proc = run_installed(site, ["sft", *flags, "--out", "out"], run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(run / "out")) == ["data_report.json", "encoded.jsonl"]
    report = json.loads((run / "out" / "data_report.json").read_text())
    assert report["kept"] == 2 and report["dropped"] == 0
    encoded = (run / "out" / "encoded.jsonl").read_text()
    rows = [json.loads(line) for line in encoded.splitlines()]
    assert len(rows) == 2
    assert all(
        -100 in r["labels"] and len(r["labels"]) == len(r["input_ids"]) for r in rows
    )
    # The installed package encodes as this checkout does, byte for byte.
    here = str(tmp_path / "here")
    assert main(["sft", *flags, "--out", here]) == 0
    assert (tmp_path / "here" / "encoded.jsonl").read_text() == encoded

    # A tiny training run: the adapter, the PEFT directory and the report.
    fx.save_tiny_llama(model)
    train = ["--model", model, "--data", data, "--steps", "2", "--batch", "2"]
    train += ["--generate-prompts", "1", "--generate-tokens", "2", "--quiet"]
    proc = run_installed(site, ["sft", *train, "--out", "trained"], run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = set(os.listdir(run / "trained"))
    assert {"adapter", "peft", "report.json", "checkpoints"} <= written
    report = json.loads((run / "trained" / "report.json").read_text())
    assert report["family"] == "llama" and len(report["train_loss"]) == 2
    assert len(report["generations"]) == 1
