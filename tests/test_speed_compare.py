"""`keras-lora compare --mode speed`: same precision against same precision.

The plan, the ratios and the PEFT peer's precision and dropout, without
starting the benchmark's child processes (test_benchmark_smoke.py runs the
engine end to end).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lora import cli
from keras_lora.bench import compare_config, engine, keras_run, peft_run, report
from keras_lora.recipes.models import architecture


@pytest.fixture
def captured(monkeypatch):
    """The `CompareConfig` the command would run (nothing runs)."""
    seen = {}

    def fake_compare(config):
        seen["config"] = config
        return {"results": []}

    monkeypatch.setattr(engine, "compare", fake_compare)
    return seen


def test_speed_mode_runs_every_installed_backend_in_both_precisions(captured):
    assert cli.main(["compare", "--mode", "speed", "--tiny"]) == 0
    config = captured["config"]
    assert config.backends == tuple(compare_config.installed_backends())
    assert set(config.backends) == {"jax", "tensorflow", "torch"}  # Here: all.
    assert config.runs == ("lora", "floor", "peft")
    assert config.base_dtypes == ("float32", "bfloat16")
    assert config.peft_autocast == ("none", "bfloat16")
    plan = engine.plan_for(
        {
            "backends": list(config.backends),
            "runs": list(config.runs),
            "base_dtypes": list(config.base_dtypes),
            "peft_autocast": list(config.peft_autocast),
        }
    )
    rows = [(backend, run, v["variant"]) for backend, run, v in plan]
    assert rows[-2:] == [
        ("torch", "peft", ""),
        ("torch", "peft", "bf16 autocast"),
    ]
    assert ("tensorflow", "lora", "bfloat16") in rows
    assert ("jax", "floor", "") in rows
    # The bfloat16 PEFT row trains under autocast; the others as asked.
    policies = {v["variant"]: engine.run_dtype_policy("float32", v) for _, _, v in plan}
    assert policies["bf16 autocast"] == "mixed_bfloat16"
    assert policies[""] is None and policies["bfloat16"] is None


def test_train_mode_defaults_are_unchanged(captured):
    args = ["compare", "--tiny", "--dropout", "0"]
    assert cli.main(args) == 0
    config = captured["config"]
    assert config.backends == ("jax", "tensorflow")
    assert config.runs == compare_config.RUNS
    assert config.base_dtypes == ("float32",)
    assert config.peft_autocast == ("none",)
    assert config.dropout == 0.0


@pytest.mark.parametrize(
    "kwargs, field, message",
    [
        ({"dropout": 1.0}, "dropout", "^dropout 1.0 must be in"),
        ({"dropout": -0.1}, "dropout", "must be in"),
        ({"dropout": 0.0, "preset": "gpt2_base_en"}, "dropout", "random-weight"),
        ({"peft_autocast": ("float16",)}, "peft_autocast", r"^peft_autocast \['"),
    ],
)
def test_bad_speed_settings_are_refused(kwargs, field, message):
    """The config names its fields; flags are the command line's (see
    test_benchmark_smoke's bad arguments)."""
    with pytest.raises(compare_config.ConfigError, match=message) as info:
        compare_config.CompareConfig(out="unused", **kwargs)
    assert info.value.field == field
    assert "--" not in str(info.value)


def result(backend, run, tokens_per_s, variant=""):
    step = 1024 / tokens_per_s
    return {
        "status": "ok",
        "backend": backend,
        "run": run,
        "variant": variant,
        "tokens_per_s": tokens_per_s,
        "median_step_s": step,
        "median_step_cpu_s": 2 * step,
        "min_step_s": step,
        "peak_memory_gb": 1.0,
        "final_loss": 6.9,
    }


def test_ratios_pair_each_precision_with_its_peer():
    results = [
        result("jax", "lora", 400.0),
        result("jax", "lora", 600.0, "bfloat16"),
        result("jax", "floor", 420.0),
        result("tensorflow", "lora", 480.0),
        result("tensorflow", "lora", 700.0, "bfloat16"),
        result("tensorflow", "floor", 500.0),
        result("torch", "peft", 400.0),
        result("torch", "peft", 500.0, "bf16 autocast"),
    ]
    config = {"backends": ["jax", "tensorflow"], "targets": ["query", "value"]}
    rows = {(r["ratio"], r["backend"]): r for r in report.ratios(results, config)}
    fp32 = rows[("lora/peft tokens/s", "jax")]
    assert fp32["value"] == 1.0 and fp32["target"] == 1.0 and fp32["verdict"] == "hit"
    tf = rows[("lora/peft tokens/s", "tensorflow")]
    assert tf["value"] == 1.2 and tf["target"] == 1.2 and tf["verdict"] == "hit"
    half = "lora (bfloat16)/peft (bf16 autocast) tokens/s"
    assert rows[(half, "jax")]["value"] == 1.2
    assert rows[(half, "jax")]["verdict"] == "miss (target is for best)"
    best = rows[(half, "best (tensorflow)")]
    assert best["value"] == 1.4 and best["target"] == 1.3 and best["verdict"] == "hit"
    floor = rows[("lora/floor step time", "tensorflow")]
    assert floor["value"] == pytest.approx(500 / 480, abs=1e-3)
    assert floor["target"] == 1.05 and floor["verdict"] == "hit"
    assert rows[("lora/floor step time", "jax")]["verdict"] == "hit"


def tiny_spec(**overrides) -> dict:
    spec = {
        "arch": architecture("tiny").backbone_config(),
        "preset": None,
        "targets": ["query", "value"],
        "rank": 4,
        "alpha": 8.0,
        "learning_rate": 1e-3,
        "seed": 0,
        "batch": 2,
        "seq": 16,
        "warmup": 0,
        "steps": 2,
        "dtype_policy": None,
    }
    return {**spec, **overrides}


def test_peft_peer_trains_under_bfloat16_autocast_with_the_dropout_asked():
    fp32 = peft_run.peft_run(tiny_spec(dropout=0.0))
    half = peft_run.peft_run(tiny_spec(dropout=0.0, dtype_policy="mixed_bfloat16"))
    # Same weights and batches: bfloat16 matmuls move the loss a little.
    assert fp32["final_loss"] != half["final_loss"]
    assert abs(fp32["final_loss"] - half["final_loss"]) < 0.05
    config = peft_run.gpt2_config(tiny_spec()["arch"], 0.0)
    assert (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) == (0, 0, 0)
    assert peft_run.gpt2_config(tiny_spec()["arch"]).attn_pdrop == 0.1


def test_keras_runs_build_the_dropout_asked():
    lm = keras_run.build_lm(tiny_spec(dropout=0.0))
    assert lm.backbone.dropout == 0.0
    attention = lm.backbone.get_layer("transformer_layer_0")._self_attention_layer
    assert attention.dropout == 0.0
    assert keras_run.build_lm(tiny_spec()).backbone.dropout == 0.1
    # No dropout: two forward passes in training mode agree exactly.
    ids = np.arange(16, dtype="int32")[None]
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    first, second = (keras.ops.convert_to_numpy(lm(x, training=True)) for _ in "ab")
    np.testing.assert_array_equal(first, second)


def load_profiler():
    """benchmarks/profile_speed.py, a script, as a module."""
    import importlib.util
    import os

    path = os.path.join(
        os.path.dirname(os.path.dirname(__file__)), "benchmarks", "profile_speed.py"
    )
    spec = importlib.util.spec_from_file_location("profile_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_sorts_every_op_of_a_step_into_kinds():
    profiler = load_profiler()
    backend = keras.backend.backend()
    # 2 x 16 tokens, so no tensor dimension is mistaken for the vocabulary.
    spec = profiler.spec_for(
        type(
            "Args",
            (),
            dict(tiny=True, run="lora", batch=2, seq=16, warmup=1, steps=1)
            | dict(dropout=None, autocast=False, base_dtype="float32"),
        )
    )
    if backend == "tensorflow":
        # Its kernels are read from tf.profiler's trace by xprof (not a
        # dependency); the classification of kernel names is checked here.
        name = "gpt2_causal_lm_1/token_embedding_1/Tensordot/MatMul:_MklMatMul"
        assert profiler.tf_category("_MklMatMul", name) == "vocabulary projection"
        grad = "gradient_tape/x/MatMul/ArithmeticOptimizer/Fold_MatMul:_MklMatMul"
        assert profiler.tf_category("_MklMatMul", grad) == "block projections"
        dropout = "m/feedforward_dropout_1/StatelessRandomUniformV2:S"
        assert profiler.tf_category("StatelessRandomUniformV2", dropout) == "dropout"
        return
    if backend == "jax":
        result = profiler.profile_jax(spec)
    else:
        result = profiler.profile_torch(spec, keras_backend=True)
    seconds = result["seconds"]
    assert set(seconds) <= set(profiler.CATEGORIES)
    for kind in ("vocabulary projection", "block projections", "LoRA factors"):
        assert seconds[kind] > 0, (kind, seconds)
    assert result["median_step_s"] > 0
    assert sum(result["ops"].values()) == pytest.approx(sum(seconds.values()))
