"""Compare keras-lora with full fine-tuning, Keras's built-in LoRA and PEFT.

Every run trains the same model on the same token data (random ids, or
`--tokens` from real text, with `--eval-batches` held out) with the same
batch and number of steps, each in its own process (Keras fixes its backend
at import, and a run's peak memory must be its own):

    full     full fine-tuning;
    lora     keras_lora.inject_lora (targets query/value by default);
    builtin  keras-hub's backbone.enable_lora(rank, target_layer_names);
    floor    everything frozen except one bias vector of block 0: a forward
             pass plus back-propagation to the first block, which any
             adapter there pays;
    peft     Hugging Face PEFT (LoRA on a transformers GPT2LMHeadModel of
             the same size), on torch, as an outside peer.

The default model is the GPT-2 base architecture (vocabulary 50257, 12
layers, 12 heads, hidden 768, intermediate 3072) with RANDOM weights, so it
runs offline; every output says so.

    python benchmarks/benchmark.py                      # jax + tensorflow
    python benchmarks/benchmark.py --backend jax --targets all --steps 6
    python benchmarks/benchmark.py --tiny --steps 2 --warmup 1
    python benchmarks/benchmark.py --render benchmarks/results/results.json

Writes results.json, results.md and bar charts (PNG) into --out (default
benchmarks/results/) and prints the table and the ratios the project's
targets are about. Exits 1 if a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ("jax", "tensorflow", "torch")
RUNS = ("full", "lora", "builtin", "floor", "peft")
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
ARCHITECTURES = {
    "base": dict(num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072),
    "medium": dict(num_layers=24, num_heads=16, hidden_dim=1024, intermediate_dim=4096),
    "large": dict(num_layers=36, num_heads=20, hidden_dim=1280, intermediate_dim=5120),
    "tiny": dict(
        vocabulary_size=1024,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=256,
    ),
}


def _list_arg(values: list[str]) -> list[str]:
    """Accept both `--runs lora floor` and `--runs lora,floor`."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        nargs="+",
        default=["jax", "tensorflow"],
        help=f"Keras backends for the Keras runs ({', '.join(BACKENDS)}).",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--arch",
        choices=[a for a in ARCHITECTURES if a != "tiny"],
        default="base",
        help="GPT-2 architecture size, with random weights.",
    )
    model.add_argument(
        "--tiny", action="store_true", help="A tiny GPT-2 (2 layers, hidden 64)."
    )
    model.add_argument(
        "--preset",
        help="keras-hub GPT-2 preset (name or local directory) for the Keras "
        "runs; the PEFT run uses the same architecture with random weights.",
    )
    parser.add_argument("--batch", type=int, default=8, help="Sequences per step.")
    parser.add_argument("--seq", type=int, default=128, help="Tokens per sequence.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps.")
    parser.add_argument(
        "--warmup", type=int, default=3, help="Untimed steps first (compilation)."
    )
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    parser.add_argument(
        "--alpha", type=float, default=32.0, help="LoRA alpha (scale alpha / rank)."
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(report.QUERY_VALUE),
        help="Layers to adapt, among: "
        + ", ".join(report.ALL_SIX)
        + "; 'all' means all six.",
    )
    parser.add_argument(
        "--dtype-policy",
        choices=DTYPE_POLICIES,
        default="float32",
        help="Keras dtype policy (the PEFT run uses torch autocast to match).",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        help=f"Which runs ({', '.join(RUNS)}).",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=5e-5, help="AdamW learning rate."
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed for weights and token data."
    )
    parser.add_argument(
        "--tokens",
        metavar="NPY",
        help="Train (and evaluate) on these token ids instead of random ones: "
        "a .npy int array of shape (rows, seq + 1), e.g. tokenized text "
        "(keras_lora.data.token_windows). Every run reads the same rows.",
    )
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=0,
        help="Hold out this many batches (the last rows of the data) and "
        "report each run's loss on them after training: the quality column.",
    )
    parser.add_argument(
        "--inference-runs", type=int, default=8, help="Timed forward passes (each)."
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Repeat every run this many times, round-robin; each run reports "
        "its round with the lowest median step time (other processes on a "
        "shared machine only ever slow a run down). results.json keeps all.",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="Seconds allowed per run."
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="Run nothing: rewrite the table, ratios and charts of an earlier "
        "results.json (in its own directory).",
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.backend = _list_arg(args.backend)
    bad = [b for b in args.backend if b not in BACKENDS]
    if bad or not args.backend:
        parser.error(
            f"unknown backend {bad or args.backend}: choose from "
            f"{', '.join(BACKENDS)}, e.g. --backend jax tensorflow"
        )
    args.backend = list(dict.fromkeys(args.backend))
    args.runs = _list_arg(args.runs)
    bad = [r for r in args.runs if r not in RUNS]
    if bad or not args.runs:
        parser.error(
            f"unknown run {bad or args.runs}: choose from {', '.join(RUNS)}, "
            "e.g. --runs lora floor"
        )
    args.runs = [r for r in RUNS if r in args.runs]
    targets = _list_arg(args.targets)
    if targets == ["all"]:
        targets = list(report.ALL_SIX)
    bad = [t for t in targets if t not in report.ALL_SIX]
    if bad or not targets:
        parser.error(
            f"unknown target {bad or targets}: use layer names among "
            f"{', '.join(report.ALL_SIX)}, or 'all' (every run must adapt the "
            "same layers, so regexes are not accepted here)"
        )
    args.targets = [t for t in report.ALL_SIX if t in targets]
    for name in ("batch", "seq", "steps", "rank", "inference_runs", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.alpha <= 0:
        parser.error("--alpha must be positive")
    if args.eval_batches < 0:
        parser.error("--eval-batches must be 0 or more")


def check_tokens(args: argparse.Namespace, vocabulary_size: int) -> str:
    """Validate `--tokens` against the run; returns the data label."""
    if not args.tokens:
        return f"random token ids (numpy default_rng, seed {args.seed})"
    import numpy as np

    try:
        rows = np.load(args.tokens, allow_pickle=False)
    except (OSError, ValueError) as error:
        sys.exit(f"error: --tokens {args.tokens!r}: cannot read a .npy ({error})")
    needed = (args.warmup + args.steps + args.eval_batches) * args.batch
    if rows.ndim != 2 or rows.shape[1] != args.seq + 1:
        sys.exit(
            f"error: --tokens {args.tokens!r} has shape {rows.shape}; expected "
            f"(rows, {args.seq + 1}) for --seq {args.seq} (inputs plus the "
            "next token)"
        )
    if rows.dtype.kind not in "iu":
        sys.exit(f"error: --tokens {args.tokens!r} holds {rows.dtype}, not int ids")
    if len(rows) < needed:
        sys.exit(
            f"error: --tokens {args.tokens!r} has {len(rows)} rows; (warmup "
            f"{args.warmup} + steps {args.steps} + eval batches "
            f"{args.eval_batches}) x batch {args.batch} = {needed} are needed "
            "(lower --steps or --batch, or tokenize more text)"
        )
    if rows.size and (rows.min() < 0 or rows.max() >= vocabulary_size):
        sys.exit(
            f"error: --tokens {args.tokens!r} has ids in [{rows.min()}, "
            f"{rows.max()}]; the model's vocabulary is {vocabulary_size}"
        )
    return f"token ids from {os.path.abspath(args.tokens)} ({len(rows)} rows)"


def model_config(args: argparse.Namespace) -> tuple[dict, str]:
    """The backbone arguments and the label every output carries."""
    arch = dict(vocabulary_size=50257, max_sequence_length=1024)
    if args.preset:
        arch.update(_preset_arch(args.preset))
        label = f"GPT-2 preset {args.preset} (PEFT run: same size, RANDOM weights)"
    elif args.tiny:
        arch.update(ARCHITECTURES["tiny"])
        label = "tiny GPT-2 (2 layers, hidden 64, vocabulary 1024), RANDOM weights"
    else:
        arch.update(ARCHITECTURES[args.arch])
        label = f"GPT-2 {args.arch} architecture, RANDOM weights"
    if args.seq > arch["max_sequence_length"]:
        sys.exit(
            f"error: --seq {args.seq} exceeds the model's max_sequence_length "
            f"{arch['max_sequence_length']}"
        )
    return arch, label


def _preset_arch(preset: str) -> dict:
    config_path = os.path.join(preset, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        config = config.get("config", config)
        keys = ("vocabulary_size", "max_sequence_length") + tuple(ARCHITECTURES["base"])
        return {k: config[k] for k in keys if k in config}
    sizes = {
        "gpt2_base_en": "base",
        "gpt2_medium_en": "medium",
        "gpt2_large_en": "large",
    }
    if preset not in sizes:
        sys.exit(
            f"error: cannot tell the architecture of preset {preset!r}: pass a "
            "local preset directory (with config.json) or one of "
            f"{', '.join(sizes)}"
        )
    return ARCHITECTURES[sizes[preset]]


def run_child(spec: dict, backend: str, log_path: str, timeout: float) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The worker imports keras_lora from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p
    )
    spec_path = spec["result_path"].replace(".json", ".spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2)
    if os.path.exists(spec["result_path"]):
        os.remove(spec["result_path"])
    command = [sys.executable, os.path.join(HERE, "worker.py"), spec_path]
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


def pick_round(every_round: list[dict], backend: str, run: str, warmup: int) -> dict:
    """The round of (backend, run) with the lowest median step time.

    Adds `round_median_steps_s` (every round's median) and `min_step_s`
    (the fastest timed step of any round: the least disturbed estimate).
    """
    rounds = [r for r in every_round if (r["backend"], r["run"]) == (backend, run)]
    ok = [r for r in rounds if r.get("status") == "ok"]
    if not ok:
        return rounds[-1]
    best = dict(min(ok, key=lambda r: r["median_step_s"]))
    best["round_median_steps_s"] = [r["median_step_s"] for r in ok]
    best["min_step_s"] = min(min(r["step_times_s"][warmup:]) for r in ok)
    return best


def plan_for(config: dict) -> list[tuple[str, str]]:
    plan = [(b, r) for b in config["backends"] for r in config["runs"] if r != "peft"]
    if "peft" in config["runs"]:
        plan.append(("torch", "peft"))
    return plan


def write_outputs(config: dict, every_round: list[dict], out: str) -> int:
    """Pick each run's round, write JSON, markdown and charts, print them."""
    results = [
        pick_round(every_round, backend, run, config["warmup"])
        for backend, run in plan_for(config)
    ]
    rows = report.ratios(results, config)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "config": config,
                "results": results,
                "ratios": rows,
                "all_rounds": every_round,
            },
            f,
            indent=2,
        )
    text = report.markdown(config, results, rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    charts = report.plots(config, results, out)
    print("\n" + text)
    print(
        f"Wrote {os.path.join(out, 'results.json')}, results.md, "
        + ", ".join(os.path.basename(c) for c in charts)
    )
    return 0 if all(r.get("status") == "ok" for r in results) else 1


def render(results_json: str) -> int:
    """Rewrite the table, ratios and charts of an earlier results.json."""
    with open(results_json) as f:
        data = json.load(f)
    every_round = data.get("all_rounds") or data["results"]
    return write_outputs(
        data["config"], every_round, os.path.dirname(os.path.abspath(results_json))
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    arch, label = model_config(args)
    data_label = check_tokens(args, arch["vocabulary_size"])
    out = os.path.abspath(args.out)
    runs_dir = os.path.join(out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    command = shlex.join(
        ["python", os.path.relpath(os.path.abspath(__file__), ROOT)] + argv
    )
    config = {
        "command": command,
        "model_label": label,
        "weights": f"preset {args.preset}" if args.preset else "random",
        "arch": arch,
        "preset": args.preset,
        "backends": args.backend,
        "runs": args.runs,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": args.targets,
        "dtype_policy": args.dtype_policy,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "inference_runs": args.inference_runs,
        "rounds": args.rounds,
        "data": data_label,
        "tokens_path": os.path.abspath(args.tokens) if args.tokens else None,
        "eval_batches": args.eval_batches,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
    }
    plan = plan_for(config)
    print(f"{label}\n{report.describe(config)}\n", flush=True)

    every_round = []
    total = len(plan) * args.rounds
    for round_index in range(args.rounds):
        for backend, run in plan:
            name = f"{backend}-{run}"
            if args.rounds > 1:
                name += f"-round{round_index + 1}"
            spec = dict(
                config,
                run=run,
                backend=backend,
                dtype_policy=None
                if args.dtype_policy == "float32"
                else args.dtype_policy,
                result_path=os.path.join(runs_dir, f"{name}.json"),
            )
            print(
                f"[{len(every_round) + 1}/{total}] {backend:10s} {run:8s} ",
                end="",
                flush=True,
            )
            started = time.perf_counter()
            result = run_child(
                spec, backend, os.path.join(runs_dir, f"{name}.log"), args.timeout
            )
            result["round"] = round_index + 1
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
    return write_outputs(config, every_round, out)


if __name__ == "__main__":
    sys.exit(main())
