"""benchmarks/packing_bench.py: the skewed lengths, the data it writes and
the plumbing of its keras-lora runs (the numbers are the benchmark's)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
    """benchmarks/packing_bench.py, a script, as a module."""
    path = os.path.join(ROOT, "benchmarks", "packing_bench.py")
    spec = importlib.util.spec_from_file_location("packing_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skewed_lengths_are_seeded_mostly_short_with_a_long_tail():
    bench = load_script()
    lengths = np.array(bench.skewed_lengths(4000, 3, 1024))
    assert bench.skewed_lengths(50, 3, 1024) == list(lengths[:50])
    assert bench.skewed_lengths(50, 4, 1024) != list(lengths[:50])
    assert 0.75 < np.mean(lengths < 64) < 0.85
    assert lengths.min() >= 8 and lengths.max() <= 1024
    assert np.sum(lengths > 256) >= 20  # The tail: ~1% beyond 256 tokens.
    assert np.median(lengths) == pytest.approx(28, abs=3)
    assert max(bench.skewed_lengths(4000, 3, 128)) == 128


def test_plumbing_keras_packed_run_on_a_tiny_model(tmp_path):
    bench = load_script()
    model = str(tmp_path / "model")
    widths = bench.write_model(model, "tiny", 512, 64)
    assert widths["hidden_size"] == 32 and widths["parameters"] > 0
    lengths = [12, 40, 10, 14, 9, 11]
    tok = os.path.join(model, "tokenizer.json")
    train = bench.write_data(str(tmp_path / "t.jsonl"), lengths[:4], tok, 0)
    evals = bench.write_data(str(tmp_path / "e.jsonl"), lengths[4:], tok, 1)
    rows = [json.loads(line) for line in open(train)]
    assert len(rows) == 4 and set(rows[0]) == {"prompt", "completion"}
    # Longer drawn lengths give longer texts.
    assert len(rows[1]["prompt"] + rows[1]["completion"]) > len(
        rows[0]["prompt"] + rows[0]["completion"]
    )
    packing = bench.rows_per_step(model, train, 2, 64)
    assert packing["examples_per_row"] > 1.0 and packing["rows"] == 1
    spec = {
        "model": model,
        "train": train,
        "eval": evals,
        "max_length": 64,
        "rank": 2,
        "alpha": 4.0,
        "batch": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        "packing": False,
        "buckets": "off",
    }
    # One child run (each compiles a model: the suite's time); the ratio and
    # table arithmetic is checked on it against a made-up fixed run.
    out = str(tmp_path / "packed")
    packed = bench.run_keras(spec | {"packing": True, "batch": 1, "run_out": out})
    assert os.path.exists(os.path.join(out, "report.json"))
    assert packed["examples_per_row"] > 1.0 and packed["padding_fraction"] < 0.5
    assert packed["real_tokens_per_s"] > 0 and np.isfinite(packed["eval_loss_after"])
    packed["peak_rss_mb"] = bench.peak_rss_mb()  # The parent adds it.
    assert packed["peak_rss_mb"] > 10
    fixed = packed | {"real_tokens_per_s": packed["real_tokens_per_s"] / 2}
    runs = {"keras-lora x fixed": fixed, "keras-lora x packed": packed}
    ratio = bench.ratios(runs, ["x"])["x packed / x fixed"]
    assert ratio == pytest.approx(2.0)
    table = bench.markdown({"runs": runs, "ratios": {"x packed / x fixed": ratio}})
    assert table.count("\n| keras-lora x ") == 2 and f"{ratio:.2f}" in table


def test_a_failing_child_is_recorded_not_raised(tmp_path):
    bench = load_script()
    result = bench.launch("nope run", "nope", "jax", {}, str(tmp_path))
    assert "KeyError: 'nope'" in result["error"][0]
    assert bench.plan_runs(["jax"], trl=True)[-1][0] == "TRL+PEFT torch packed"
    assert [r[0] for r in bench.plan_runs(["torch"], trl=False)] == [
        "keras-lora torch fixed",
        "keras-lora torch buckets",
        "keras-lora torch packed",
    ]
