"""`keras-lora demo`: the offline main job, in one command.

1. A short LoRA fine-tune (rank 4, alpha 32, query/value) of the GPT-2 base
   architecture with random weights on the default corpus (Python
   standard-library docstrings, byte-level BPE tokenizer trained on it):
   writes the adapter, the random base preset, `run_report.json` and
   `training_loss.png` (`keras-lora finetune`).
2. The comparison: full fine-tuning vs keras-lora vs keras-hub's
   `enable_lora` (and Hugging Face PEFT on torch when it is installed), each
   in its own process, on token windows of the same corpus, with held-out
   batches for quality (`benchmarks/benchmark.py --tokens`): writes
   `compare/results.{json,md}` and the memory, step-time and throughput
   charts.
3. `report.md`: both on one page.

Everything runs offline; the Keras runs use the current backend
(`KERAS_BACKEND`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time

import keras

from keras_lora import cli, data
from keras_lora.files import atomic_write

BENCHMARK_ARCH = {"tiny": ["--tiny"], "gpt2-base-random": ["--arch", "base"]}
COMPARE_RUNS = ("full", "lora", "builtin", "peft")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `keras-lora demo`."""
    parser.add_argument("--out", default=os.path.join("runs", "demo"))
    parser.add_argument(
        "--arch", choices=sorted(cli.ARCHITECTURES), default="gpt2-base-random"
    )
    parser.add_argument(
        "--steps", type=cli.positive_int, default=20, help="fine-tuning steps."
    )
    parser.add_argument(
        "--compare-steps",
        type=cli.positive_int,
        default=4,
        help="timed training steps of each comparison run.",
    )
    parser.add_argument(
        "--warmup",
        type=cli.positive_int,
        default=2,
        help="untimed steps before them (compilation).",
    )
    parser.add_argument(
        "--eval-batches",
        type=cli.positive_int,
        default=4,
        help="held-out batches for each comparison run's quality.",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=COMPARE_RUNS,
        default=list(COMPARE_RUNS),
        help="comparison runs (peft is skipped when torch, transformers or "
        "peft is missing).",
    )
    parser.add_argument("--batch", type=cli.positive_int, default=8)
    parser.add_argument("--seq", type=cli.positive_int, default=128)
    parser.add_argument("--learning-rate", type=cli.positive_float, default=5e-5)
    parser.add_argument(
        "--max-documents",
        type=cli.positive_int,
        help="use at most this many documents of the corpus.",
    )
    parser.add_argument(
        "--vocab-size",
        type=cli.positive_int,
        help="vocabulary of the trained tokenizer.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=1, help="fit verbosity."
    )


def demo(args: argparse.Namespace) -> int:
    """Fine-tune, compare, report; returns the exit status."""
    started = time.perf_counter()
    backend = keras.backend.backend()
    runs = _available_runs(args.runs)
    benchmark = cli.find_benchmark()  # Fails before any work without it.
    os.makedirs(args.out, exist_ok=True)
    needed_rows = (args.warmup + args.compare_steps + args.eval_batches) * args.batch

    print(f"== 1/2 LoRA fine-tune ({args.arch}, {backend}) ==", flush=True)
    finetune_argv = [
        "finetune", "--arch", args.arch, "--steps", str(args.steps),
        "--batch", str(args.batch), "--seq", str(args.seq),
        "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
        "--verbose", str(args.verbose), "--out", args.out,
    ]  # fmt: skip
    if args.max_documents:
        finetune_argv += ["--max-documents", str(args.max_documents)]
    if args.vocab_size:
        finetune_argv += ["--vocab-size", str(args.vocab_size)]
    cli.finetune(cli.build_parser().parse_args(finetune_argv))
    gc.collect()  # The fine-tuned model is gone; give its memory back.
    keras.backend.clear_session(free_memory=True)

    compare_dir = os.path.join(args.out, "compare")
    os.makedirs(compare_dir, exist_ok=True)
    tokens_path = os.path.join(compare_dir, "tokens.npy")
    _write_tokens(args, tokens_path, needed_rows)

    print(f"\n== 2/2 full fine-tuning vs LoRA ({', '.join(runs)}) ==", flush=True)
    command = [
        sys.executable, benchmark, *BENCHMARK_ARCH[args.arch],
        "--backend", backend, "--runs", *runs,
        "--steps", str(args.compare_steps), "--warmup", str(args.warmup),
        "--eval-batches", str(args.eval_batches), "--tokens", tokens_path,
        "--batch", str(args.batch), "--seq", str(args.seq),
        "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
        "--out", compare_dir,
    ]  # fmt: skip
    status = _stream(command)
    if not os.path.isfile(os.path.join(compare_dir, "results.md")):
        raise ValueError(f"the comparison wrote no results (exit {status})")

    report_path = write_report(args.out, compare_dir, time.perf_counter() - started)
    print(
        f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} min: "
        f"adapter {os.path.join(args.out, 'adapter')}; report {report_path}; "
        f"plots {os.path.join(args.out, 'training_loss.png')}, "
        f"{os.path.join(compare_dir, 'peak_memory.png')}"
    )
    return status


def _available_runs(runs: list[str]) -> list[str]:
    runs = list(dict.fromkeys(runs))
    missing = [
        m for m in ("torch", "transformers", "peft") if not importlib.util.find_spec(m)
    ]
    if "peft" in runs and missing:
        print(f"(skipping the PEFT run: {', '.join(missing)} not installed)")
        runs.remove("peft")
    if not runs:
        raise ValueError("no comparison run left: pass --runs full lora")
    return runs


def _write_tokens(args: argparse.Namespace, path: str, needed_rows: int) -> None:
    """The corpus as token windows, with the fine-tune's tokenizer."""
    import keras_hub
    import numpy as np

    tokenizer = keras_hub.models.GPT2Tokenizer.from_preset(
        os.path.join(args.out, "base_preset")
    )
    texts = data.default_corpus(max_documents=args.max_documents)
    rows = data.token_windows(texts, tokenizer, args.seq + 1, shuffle_seed=args.seed)
    if len(rows) < needed_rows:
        raise ValueError(
            f"the corpus gives {len(rows)} windows of {args.seq + 1} tokens; "
            f"the comparison needs {needed_rows} ((warmup + compare steps + "
            "eval batches) x batch): lower those or drop --max-documents"
        )
    np.save(path, rows[:needed_rows])


def _stream(command: list[str]) -> int:
    """Run a command, printing its output as it comes (through sys.stdout)."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
    return proc.returncode


def write_report(out: str, compare_dir: str, seconds: float) -> str:
    """`report.md`: the fine-tune's summary and the comparison, one page."""
    with open(os.path.join(out, "run_report.json")) as f:
        run = json.load(f)
    with open(os.path.join(compare_dir, "results.md")) as f:
        comparison = f.read().split("\n", 1)[1].strip()  # Drop its title.
    losses = run["loss_per_step"]
    head, tail = cli.first_and_last(losses)
    generations = [
        f"- `{p}` -> before: {b!r}; after: {a!r}"
        for p, b, a in zip(
            run["prompts"],
            run["generations_before"],
            run["generations_after"],
            strict=True,
        )
    ]
    lines = [
        "# keras-lora demo",
        "",
        f"Backend {run['backend']}; keras {run['versions']['keras']}, keras-hub "
        f"{run['versions']['keras_hub']}, keras-lora "
        f"{run['versions']['keras_lora']}; {os.cpu_count()} CPU cores; "
        f"{seconds / 60:.1f} min in all.",
        "",
        "## LoRA fine-tune",
        "",
        f"- weights: {run['weights']}",
        f"- tokenizer: {run['tokenizer']}",
        f"- data: {run['data']}",
        f"- LoRA rank {run['lora']['rank']}, alpha {run['lora']['alpha']}, "
        f"targets {', '.join(run['lora']['targets'])}: "
        f"{run['parameters']['trainable']:,} trainable of "
        f"{run['parameters']['total']:,} parameters",
        f"- {run['steps']} steps of {run['batch']} x {run['sequence_length']} "
        f"tokens in {run['fit_seconds']} s; loss (mean of first / last "
        f"{len(tail)} steps) {sum(head) / len(head):.4f} -> "
        f"{sum(tail) / len(tail):.4f}; peak memory {run['peak_memory_gb']} GB "
        f"({run['memory_device']})",
        "- files: `adapter/`, `base_preset/`, `run_report.json`, `training_loss.png`",
        "",
        "Greedy generations before and after (random base weights, so "
        "neither reads as English):",
        "",
        *generations,
        "",
        "## Full fine-tuning vs LoRA",
        "",
        comparison,
        "",
        "Charts: `compare/peak_memory.png`, `compare/step_time.png`, "
        "`compare/tokens_per_s.png`.",
        "",
    ]
    path = os.path.join(out, "report.md")
    atomic_write(path, "\n".join(lines).encode("utf-8"))
    return path
