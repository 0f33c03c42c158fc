"""`keras-lora compare` end to end: 2 steps of a tiny GPT-2, this backend only.

Run as `python -m keras_lora.cli compare` in a child process, as a user
would; the engine starts one `python -m keras_lora.bench.worker` per run.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "keras_lora.cli", "compare"]

COMMON_KEYS = {
    "status",
    "run",
    "backend",
    "trainable_params",
    "frozen_params",
    "step_times_s",
    "median_step_s",
    "tokens_per_s",
    "peak_memory_gb",
    "memory_device",
    "final_loss",
    "adapter_bytes",
}
POSITIVE = (
    "trainable_params",
    "frozen_params",
    "median_step_s",
    "tokens_per_s",
    "peak_memory_gb",
    "final_loss",
    "adapter_bytes",
)


def run_benchmark(args, out_dir, command=COMMAND):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p
    )  # This checkout's keras_lora, wherever pytest runs.
    return subprocess.run(
        [*command, *args, "--out", str(out_dir)],
        cwd=out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def compare_in_process(args, out_dir, capsys, monkeypatch):
    """`keras-lora compare` in this process: (exit status, stderr).

    For what needs no worker (argument checks, `--render`): a child would
    pay ~5-20 s of imports for a few milliseconds of work, and the command
    line itself is already run as a child above."""
    from keras_lora import cli

    monkeypatch.chdir(out_dir)
    capsys.readouterr()
    code = cli.main(["compare", *args, "--out", str(out_dir)])
    return code, capsys.readouterr().err


def test_benchmark_tiny_two_steps(tmp_path, capsys, monkeypatch):
    backend = keras.backend.backend()
    # PEFT runs on torch, so the torch test process also smoke-tests it.
    runs = ["lora", "floor"] + (["peft"] if backend == "torch" else [])
    args = [
        "--tiny",
        "--backend",
        backend,
        "--runs",
        *runs,
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--seq",
        "16",
        "--inference-runs",
        "1",
        "--eval-batches",
        "1",
    ]
    proc = run_benchmark(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(tmp_path / "results.json") as f:
        data = json.load(f)
    assert "RANDOM weights" in data["config"]["model_label"]
    assert data["config"]["weights"] == "random"
    results = {r["run"]: r for r in data["results"]}
    assert sorted(results) == sorted(runs)
    for run, result in results.items():
        assert COMMON_KEYS <= set(result), (run, COMMON_KEYS - set(result))
        assert result["status"] == "ok"
        for key in POSITIVE:
            assert result[key] > 0, (run, key, result[key])
        assert len(result["step_times_s"]) == 3  # 1 warm-up + 2 timed steps.
        # Random ids over 1024 tokens: the held-out loss is near ln(1024).
        assert abs(result["eval_loss"] - np.log(1024)) < 0.5, (run, result)

    lora, floor = results["lora"], results["floor"]
    assert lora["backend"] == floor["backend"] == backend
    assert floor["trainable_params"] == 64  # One query bias, hidden 64.
    # 2 blocks x (query, value) x (A 64x4 + B 4x64) at rank 4.
    assert lora["trainable_params"] == 2 * 2 * (64 * 4 + 4 * 64)
    for key in ("inference_base_s", "inference_merged_s", "inference_unmerged_s"):
        assert lora[key] > 0, key
    if "peft" in results:
        assert results["peft"]["backend"] == "torch"
        assert results["peft"]["trainable_params"] == 2 * (64 * 4 + 4 * 3 * 64)

    names = {row["ratio"] for row in data["ratios"]}
    assert {"lora/floor step time", "merged/base inference"} <= names
    for name in ("results.md", "peak_memory.png", "step_time.png", "tokens_per_s.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "| ratio | backend | value | target | verdict |" in proc.stdout
    assert data["config"]["command"].startswith("keras-lora compare --tiny")
    # Each run got its own spec (and process), with the family's targets.
    for run in runs:
        spec_path = tmp_path / "runs" / f"{backend}-{run}.spec.json"
        spec = json.loads(spec_path.read_text())
        assert spec["run"] == run and spec["targets"] == ["query", "value"]

    # --render rewrites the report from results.json without running anything.
    (tmp_path / "results.md").unlink()
    render = ["--render", str(tmp_path / "results.json")]
    code, err = compare_in_process(render, tmp_path, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert "| lora/floor step time |" in (tmp_path / "results.md").read_text()


def test_benchmark_quantized_remat_lora_row(tmp_path):
    # One LoRA row over an int8 base built in RematScope("activations"):
    # its own label, a training increment, and a finite loss after the
    # same 1 + 2 steps. ("blocks" differs only in `remat_blocks`, below.)
    remat, label = "activations", "int8, remat"
    backend = keras.backend.backend()
    args = ["--tiny", "--backend", backend, "--runs", "lora", "--quantize", "int8"]
    args += ["--remat", remat, "--steps", "2", "--warmup", "1"]
    proc = run_benchmark(args + ["--batch", "2", "--seq", "16"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["quantize"] == ["int8"]
    assert data["config"]["remat"] == [remat]
    (result,) = data["results"]
    assert result["status"] == "ok", result
    assert (result["run"], result["variant"]) == ("lora", label)
    assert (result["quantize"], result["remat"]) == ("int8", remat)
    assert result["base_dtype"] == "float32"
    assert result["training_increment_gb"] >= 0
    if result["memory_device"] == "host RSS":
        assert result["baseline_rss_gb"] > 0
        assert result["process_peak_rss_gb"] == pytest.approx(
            result["baseline_rss_gb"] + result["training_increment_gb"], abs=0.002
        )
    assert np.isfinite(result["final_loss"]) and result["final_loss"] > 0
    assert len(result["step_times_s"]) == 3
    # Only the LoRA factors train: the quantized base stays frozen.
    assert result["trainable_params"] == 2 * 2 * (64 * 4 + 4 * 64)
    assert f"| keras-lora ({label}) |" in (tmp_path / "results.md").read_text()
    name = f"{backend}-lora-{label.replace(', ', '-')}.spec.json"
    spec = json.loads((tmp_path / "runs" / name).read_text())
    assert (spec["quantize"], spec["remat"], spec["variant"]) == ("int8", remat, label)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "jaxx"], "unknown backend"),
        (["--runs", "lora", "qlora"], "unknown run"),
        (["--targets", "query", "mlp.*"], "unknown target"),
        (["--tiny", "--seq", "4096"], "exceeds the model's max_sequence_length"),
        (["--quantize", "int3"], "--quantize ['int3']: choose among none, int8"),
        (["--remat", "full"], "'larger_than' are not supported by Keras"),
        (["--base-dtype", "float16"], "--base-dtype ['float16']"),
        (["--loss", "sparse"], "--loss ['sparse']: choose among dense, chunked"),
        (["--peft-autocast", "float16"], "--peft-autocast ['float16']"),
        (["--tiny", "--dropout", "1.0"], "--dropout 1.0 must be in [0, 1)"),
        (["--loss-chunks", "0"], "--loss-chunks must be at least 1"),
    ],
)
def test_benchmark_rejects_bad_arguments(args, message, tmp_path, capsys, monkeypatch):
    code, err = compare_in_process(args, tmp_path, capsys, monkeypatch)
    assert code == 1
    ours = [line for line in err.splitlines() if line.startswith("keras-lora")]
    assert len(ours) == 1 and message in ours[0], err
    assert not (tmp_path / "results.json").exists()


def test_old_script_path_runs_compare(tmp_path):
    script = [sys.executable, os.path.join(ROOT, "benchmarks", "benchmark.py")]
    proc = run_benchmark(["--backend", "jaxx"], tmp_path, command=script)
    assert proc.returncode == 1 and "unknown backend" in proc.stderr


def write_tokens(path, rows, width, high=1024):
    tokens = np.random.default_rng(0).integers(0, high, (rows, width))
    np.save(path, tokens.astype("int32"))
    return str(path)


@pytest.mark.parametrize(
    "rows, width, high, message",
    [
        (20, 16, 1024, "expected (rows, 17) for --seq 16"),
        (5, 17, 1024, "has 5 rows; (warmup 1 + steps 2 + eval batches 1) x batch 2"),
        (20, 17, 5000, "the model's vocabulary is 1024"),
    ],
)
def test_benchmark_rejects_bad_token_files(
    tmp_path, capsys, monkeypatch, rows, width, high, message
):
    tokens = write_tokens(tmp_path / "tokens.npy", rows, width, high)
    args = ["--tiny", "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1"]
    args += ["--eval-batches", "1", "--tokens", tokens]
    code, err = compare_in_process(args, tmp_path, capsys, monkeypatch)
    assert code == 1
    assert message in err
    assert not (tmp_path / "results.json").exists()


def _row(run, variant="", step=1.0, increment=1.0, loss=5.0):
    return {
        "status": "ok",
        "backend": "jax",
        "run": run,
        "variant": variant,
        "median_step_s": step,
        "peak_memory_gb": increment + 1.0,
        "training_increment_gb": increment,
        "final_loss": loss,
        "trainable_params": 2048,
        "tokens_per_s": 1000.0,
        "memory_device": "host RSS",
    }


def test_memory_ratios_against_targets():
    from keras_lora.bench import report

    results = [
        _row("full", increment=4.0),
        _row("lora", increment=2.0),
        _row("lora", "int8", step=1.2, increment=1.5, loss=5.05),
        _row("lora", "int4", step=1.4, increment=1.2, loss=5.2),
        _row("lora", "int8, remat", step=1.5, increment=0.8),
    ]
    config = {"backends": ["jax"], "targets": ["query", "value"]}
    rows = {r["ratio"]: r for r in report.ratios(results, config)}
    assert rows["lora (int8, remat)/full training increment"]["value"] == 0.2
    assert rows["lora (int8, remat)/full training increment"]["verdict"] == "hit"
    assert rows["lora/full training increment"]["value"] == 0.5
    assert rows["lora (int8)/lora step time"]["value"] == 1.2
    assert rows["lora (int8)/lora step time"]["verdict"] == "hit"
    assert rows["lora (int8)/lora final loss change"]["value"] == 0.01
    assert rows["lora (int8)/lora final loss change"]["verdict"] == "hit"
    assert rows["lora (int4)/lora final loss change"]["value"] == 0.04
    assert rows["lora (int4)/lora final loss change"]["verdict"] == "miss"
    # The plain run's ratios read the plain row, not a variant.
    assert rows["lora/full peak memory"]["value"] == 0.6
    table = "\n".join(report.table_rows(results))
    assert "| keras-lora (int8, remat) |" in table
    assert "| keras-lora |" in table


def test_benchmark_mixed_mode_tiny(tmp_path, capsys, monkeypatch):
    """`compare --mode mixed`: 3 adapters, every row its own, this backend
    (and PEFT's `adapter_names=` on torch)."""
    backend = keras.backend.backend()
    args = [
        "--mode",
        "mixed",
        "--tiny",
        "--backend",
        backend,
        "--runs",
        "peft" if backend == "torch" else "lora",
        "--adapters",
        "3",
        "--rank",
        "2",
        "--batch",
        "3",
        "--seq",
        "8",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--generate-repeats",
        "1",
        "--switches",
        "1",
    ]
    proc = run_benchmark(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["mode"] == "mixed"
    runs = {r["run"]: r for r in data["results"]}
    expected = ["mixed-keras"] + (["mixed-peft"] if backend == "torch" else [])
    assert sorted(runs) == sorted(expected)
    for run, result in runs.items():
        assert result["status"] == "ok", (run, result.get("error"))
        assert result["rows"] == ["adapter_0", "adapter_1", "adapter_2"]
        for task in ("forward", "generate"):
            for variant in ("lone", "single", "mixed"):
                assert result[f"{task}_{variant}_s"] > 0, (run, task, variant)
        assert result["generate_after_switch_s"] > 0
        # Each row of the mixed batch is its adapter's output alone.
        assert result["mixed_vs_single_max_abs_diff"] < 1e-4, (run, result)
    assert runs["mixed-keras"]["backend"] == backend
    ratios = {(row["who"], row["ratio"]) for row in data["ratios"]}
    assert (f"keras-lora {backend}", "generate: mixed / one active adapter") in ratios
    assert (
        "| who | ratio | value | target | verdict |"
        in (tmp_path / "results.md").read_text()
    )
    # --render rewrites the mixed report from results.json.
    (tmp_path / "results.md").unlink()
    render = ["--render", str(tmp_path / "results.json")]
    code, err = compare_in_process(render, tmp_path, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert "mixed / one active adapter" in (tmp_path / "results.md").read_text()


def test_remat_blocks_wraps_every_block_of_the_built_model():
    from keras_lora.bench import keras_run
    from keras_lora.recipes.models import architecture

    spec = dict(
        arch=architecture("tiny").backbone_config(), preset=None, remat="blocks"
    )
    lm = keras_run.build_lm(spec)
    assert keras_run.remat_blocks(lm, dict(spec, remat="none")) == 0
    assert keras_run.remat_blocks(lm, spec) == spec["arch"]["num_layers"] > 0
    blocks = lm.backbone.transformer_layers
    assert all(getattr(b, "_keras_lora_remat", False) for b in blocks)
