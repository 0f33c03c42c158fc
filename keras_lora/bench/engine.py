"""Compare keras-lora with full fine-tuning, Keras's built-in LoRA and PEFT.

`compare(CompareConfig(...))` trains the same GPT-2 on the same token data
(random ids, or `tokens` from real text, with `eval_batches` held out) with
the same batch and number of steps, once per (backend, run). Each run is a
child process, `python -m keras_lora.bench.worker SPEC.json`, because
Keras fixes its backend at import and a run's peak memory must be its own:

    full     full fine-tuning;
    lora     keras_lora.inject_lora (the family's default targets);
    builtin  keras-hub's backbone.enable_lora(rank, target_layer_names);
    floor    everything frozen except one bias vector of block 0: a forward
             pass plus back-propagation to the first block, which any
             adapter there pays;
    peft     Hugging Face PEFT (LoRA on a transformers GPT2LMHeadModel of
             the same size), on torch, as an outside peer.

The LoRA run can also train over a cheaper frozen base: `base_dtypes`
(bfloat16: the whole model under that dtype policy), `quantize` (int8,
int4: `model.quantize(mode)` before `inject_lora`) and `remat`
("activations": build and inject inside `keras.RematScope`). Every
combination asked for is one more LoRA row, labelled by its `variant`
(e.g. "int8, remat"); the plain float32 row has variant "".

The default model is the GPT-2 base architecture with RANDOM weights, so it
runs offline; every output says so. Writes `results.json`, `results.md` and
bar charts into `out` (`keras_lora.bench.report`).

The config and its checks are `keras_lora.bench.compare_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

from keras_lora.bench import report
from keras_lora.bench.compare_config import (
    PEFT_AUTOCAST_LABELS,
    CompareConfig,
    check_tokens,
    model_config,
)
from keras_lora.files import atomic_write


def lora_variants(config: dict) -> list[dict]:
    """The LoRA run's frozen-base settings, one dict per row to run.

    Each has `base_dtype`, `quantize`, `quantize_build`, `remat`, `loss`
    and `variant`, its label ("" for the plain float32 run, else e.g.
    "int8, remat"). A config written before these options existed gives
    the plain run only.
    """
    variants = []
    for dtype in config.get("base_dtypes", ["float32"]):
        for mode in config.get("quantize", ["none"]):
            builds = config.get("quantize_build", ["after"]) if mode != "none" else []
            for build in builds or ["after"]:
                for remat in config.get("remat", ["none"]):
                    for loss in config.get("losses", ["dense"]):
                        parts = [
                            p for p in (dtype, mode) if p not in ("float32", "none")
                        ]
                        if build == "during":
                            parts[-1] += " built quantized"
                        if remat != "none":
                            parts.append(
                                "remat" if remat == "activations" else f"remat {remat}"
                            )
                        if loss != "dense":
                            parts.append(f"{loss} CE")
                        variants.append(
                            {
                                "base_dtype": dtype,
                                "quantize": mode,
                                "quantize_build": build,
                                "remat": remat,
                                "loss": loss,
                                "variant": ", ".join(parts),
                            }
                        )
    return variants


def plan_for(config: dict) -> list[tuple[str, str, dict]]:
    """(backend, run, frozen-base settings) in run order; PEFT on torch,
    once per `peft_autocast` precision.

    Runs other than LoRA get the plain settings (variant ""), once per
    training loss.
    """
    variants = lora_variants(config)
    plain = [
        {
            "base_dtype": "float32",
            "quantize": "none",
            "quantize_build": "after",
            "remat": "none",
            "loss": loss,
            "variant": "" if loss == "dense" else f"{loss} CE",
        }
        for loss in config.get("losses", ["dense"])
    ]
    plan = [
        (b, r, v)
        for b in config["backends"]
        for r in config["runs"]
        if r != "peft"
        for v in (variants if r == "lora" else plain)
    ]
    if "peft" in config["runs"]:
        for autocast in config.get("peft_autocast", ["none"]):
            label = PEFT_AUTOCAST_LABELS[autocast]
            variant = plain[0]["variant"]
            plan.append(
                (
                    "torch",
                    "peft",
                    dict(
                        plain[0],
                        autocast=autocast,
                        variant=", ".join(p for p in (variant, label) if p),
                    ),
                )
            )
    return plan


def run_dtype_policy(dtype_policy: str, variant: dict) -> str | None:
    """The dtype policy a run's spec carries (None: float32); a PEFT row
    with bfloat16 autocast trains under "mixed_bfloat16"."""
    if variant.get("autocast", "none") != "none":
        return f"mixed_{variant['autocast']}"
    return None if dtype_policy == "float32" else dtype_policy


def run_child(spec: dict, backend: str, log_path: str, timeout: float) -> dict:
    """One run in a fresh process; its result, or an error result."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    spec_path = spec["result_path"].replace(".json", ".spec.json")
    atomic_write(spec_path, json.dumps(spec, indent=2).encode("utf-8"))
    if os.path.exists(spec["result_path"]):
        os.remove(spec["result_path"])
    # The worker is a module of this package: the child imports keras_lora
    # exactly as this process found it (installed or on PYTHONPATH).
    command = [sys.executable, "-m", "keras_lora.bench.worker", spec_path]
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    if os.path.exists(spec["result_path"]):
        with open(spec["result_path"]) as f:
            return json.load(f)
    return {
        "run": spec["run"],
        "backend": backend,
        "status": "error",
        "error": f"worker exited with {returncode} and no result; see {log_path}",
    }


def pick_round(
    every_round: list[dict], backend: str, run: str, warmup: int, variant: str = ""
) -> dict:
    """The round of (backend, run, variant) with the lowest median step time.

    Adds `round_median_steps_s` (every round's median) and `min_step_s`
    (the fastest timed step of any round: the least disturbed estimate).
    """
    rounds = [
        r
        for r in every_round
        if (r["backend"], r["run"], r.get("variant", "")) == (backend, run, variant)
    ]
    ok = [r for r in rounds if r.get("status") == "ok"]
    if not ok:
        return rounds[-1]
    best = dict(min(ok, key=lambda r: r["median_step_s"]))
    best["round_median_steps_s"] = [r["median_step_s"] for r in ok]
    best["min_step_s"] = min(min(r["step_times_s"][warmup:]) for r in ok)
    return best


def succeeded(results: dict) -> bool:
    """Whether every run of a `compare` result finished."""
    return all(r.get("status") == "ok" for r in results["results"])


def write_outputs(config: dict, every_round: list[dict], out: str) -> dict:
    """Pick each run's round, write JSON, markdown and charts, print them."""
    results = [
        pick_round(every_round, backend, run, config["warmup"], v["variant"])
        for backend, run, v in plan_for(config)
    ]
    rows = report.ratios(results, config)
    data = {
        "config": config,
        "results": results,
        "ratios": rows,
        "all_rounds": every_round,
    }
    atomic_write(
        os.path.join(out, "results.json"), json.dumps(data, indent=2).encode("utf-8")
    )
    text = report.markdown(config, results, rows)
    atomic_write(os.path.join(out, "results.md"), text.encode("utf-8"))
    charts = report.plots(config, results, out)
    print("\n" + text)
    print(
        f"Wrote {os.path.join(out, 'results.json')}, results.md, "
        + ", ".join(os.path.basename(c) for c in charts)
    )
    return data


def read_results(results_json: str) -> tuple[dict, str]:
    """An earlier results.json of `compare` (either mode) and its directory.

    Raises:
        FileNotFoundError: when `results_json` does not exist.
        ValueError: when it is not a `compare` result.
    """
    with open(results_json) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{results_json} is not JSON: {error}") from error
    if not isinstance(data, dict) or "config" not in data or "results" not in data:
        raise ValueError(f"{results_json} is not a results.json of compare")
    return data, os.path.dirname(os.path.abspath(results_json))


def render(data: dict, out: str) -> dict:
    """Rewrite the table, ratios and charts of an earlier training
    comparison (`read_results`) in `out`. (A mixed-batch result renders
    with `keras_lora.bench.mixed.render`.)"""
    every_round = data.get("all_rounds") or data["results"]
    return write_outputs(data["config"], every_round, out)


def compare(config: CompareConfig) -> dict:
    """Run every (backend, run) of `config`, each in its own process.

    Args:
        config: what to run.

    Returns:
        What `results.json` holds: `{"config", "results", "ratios",
        "all_rounds"}`; a failed run has `"status": "error"` and an
        `"error"` (see `succeeded`).

    Raises:
        ValueError: for a bad preset, sequence length or token file, before
            anything runs.
    """
    arch, label = model_config(config)
    data_label = check_tokens(config, arch["vocabulary_size"])
    out = os.path.abspath(config.out)
    runs_dir = os.path.join(out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    # results.json's "config": every field but where outputs and data live
    # and the time limit, which do not change what a run measures; "arch"
    # becomes the backbone's arguments.
    fields = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in dataclasses.asdict(config).items()
        if name not in ("out", "tokens", "timeout")
    }
    settings = {
        **fields,
        "model_label": label,
        "weights": f"preset {config.preset}" if config.preset else "random",
        "arch": arch,
        "data": data_label,
        "tokens_path": os.path.abspath(config.tokens) if config.tokens else None,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
    }
    plan = plan_for(settings)
    print(f"{label}\n{report.describe(settings)}\n", flush=True)

    every_round = []
    total = len(plan) * config.rounds
    for round_index in range(config.rounds):
        for backend, run, variant in plan:
            name = f"{backend}-{run}"
            if variant["variant"]:
                name += "-" + variant["variant"].replace(", ", "-")
            if config.rounds > 1:
                name += f"-round{round_index + 1}"
            spec = dict(
                settings,
                **variant,
                run=run,
                backend=backend,
                dtype_policy=run_dtype_policy(config.dtype_policy, variant),
                result_path=os.path.join(runs_dir, f"{name}.json"),
            )
            print(
                f"[{len(every_round) + 1}/{total}] {backend:10s} "
                f"{report.run_label(run, variant['variant']):28s} ",
                end="",
                flush=True,
            )
            started = time.perf_counter()
            log_path = os.path.join(runs_dir, f"{name}.log")
            result = run_child(spec, backend, log_path, config.timeout)
            result["round"] = round_index + 1
            result.setdefault("variant", variant["variant"])
            elapsed = time.perf_counter() - started
            if result.get("status") == "ok":
                print(
                    f"{elapsed:6.1f} s  median step {result['median_step_s']:.3f} s  "
                    f"peak {result['peak_memory_gb']:.2f} GB  "
                    f"load {result['load_average_1min']:.1f}",
                    flush=True,
                )
            else:
                print(f"{elapsed:6.1f} s  FAILED: {result.get('error')}", flush=True)
            every_round.append(result)
    return write_outputs(settings, every_round, out)
