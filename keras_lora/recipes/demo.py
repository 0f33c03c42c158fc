"""`keras-lora demo`: the offline main job, as one function.

1. Quality (`recipes.quality`): keras-lora's own small pretrained GPT-2
   (shipped in the package, `recipes.pretrain`) fine-tuned on Python source
   code with keras-lora's LoRA, full fine-tuning, keras-hub's `enable_lora`
   and Hugging Face PEFT (torch, same weights through a Hugging Face
   export): held-out losses before and after on the new domain and on the
   original one (forgetting), generations, `quality.json` and
   `quality_loss.png`.
2. The cost table: the same four kinds of run on the GPT-2 base
   architecture (random weights: time, memory and file sizes only matter
   at that scale), each in its own process, on token windows of the code
   corpus (`bench.engine.compare`): `compare/results.{json,md}` and the
   memory, step-time and throughput charts.
3. `report.md`: both on one page.

Everything runs offline; the Keras runs use the current backend
(`KERAS_BACKEND`).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import os
import shlex
import sys
import time

import keras

from keras_lora.bench import engine
from keras_lora.bench.compare_config import CompareConfig
from keras_lora.files import atomic_write
from keras_lora.optional import require
from keras_lora.recipes import data, models, pretrain, tokenization
from keras_lora.recipes.quality_config import RUNS, QualityConfig

COMPARE_RUNS = RUNS
# Roughly the characters of code per token of the shipped tokenizer, with a
# margin: the cost table tokenizes only what it needs.
CHARS_PER_TOKEN = 8


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What `demo` runs; checked when made.

    Args:
        out: output directory.
        arch: the cost table's random-weight architecture (`recipes.models`).
        compare_steps: timed training steps of each cost run.
        warmup: untimed steps before them (compilation).
        eval_batches: held-out batches for each cost run's loss.
        inference_runs: timed forward passes of the cost table's LoRA run
            (base, merged, unmerged).
        runs: runs of both parts (`COMPARE_RUNS`); peft is skipped, with the
            reason printed, when torch, transformers or peft is missing.
        batch, seq: rows per step and tokens per row of the cost table.
        learning_rate: the cost table's AdamW learning rate.
        seed: seeds everything.
        quality: run the quality part (`recipes.quality`).
        quality_steps, quality_batch, quality_seq, quality_eval_rows,
        quality_max_length: its `QualityConfig` steps, batch, seq,
            eval_rows and max_length.
    """

    out: str = os.path.join("runs", "demo")
    arch: str = "base"
    compare_steps: int = 2
    warmup: int = 1
    eval_batches: int = 2
    inference_runs: int = 3
    runs: tuple[str, ...] = COMPARE_RUNS
    batch: int = 8
    seq: int = 128
    learning_rate: float = 5e-5
    seed: int = 0
    quality: bool = True
    quality_steps: int = QualityConfig.steps
    quality_batch: int = QualityConfig.batch
    quality_seq: int = QualityConfig.seq
    quality_eval_rows: int = QualityConfig.eval_rows
    quality_max_length: int = QualityConfig.max_length

    def __post_init__(self):
        models.architecture(self.arch)
        bad = [r for r in self.runs if r not in COMPARE_RUNS]
        if bad or not self.runs:
            raise ValueError(
                f"unknown run {bad or list(self.runs)}: choose from "
                f"{', '.join(COMPARE_RUNS)}"
            )
        for name in (
            "compare_steps",
            "warmup",
            "eval_batches",
            "inference_runs",
            "batch",
            "seq",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        object.__setattr__(self, "runs", tuple(dict.fromkeys(self.runs)))
        self.quality_config()  # Checks the quality settings.

    def quality_config(self) -> QualityConfig:
        """The quality part's settings."""
        return QualityConfig(
            out=self.out,
            steps=self.quality_steps,
            batch=self.quality_batch,
            seq=self.quality_seq,
            runs=self.runs,
            eval_rows=self.quality_eval_rows,
            max_length=self.quality_max_length,
            eval_every=max(1, self.quality_steps // 6),
            seed=self.seed,
        )


def demo(config: DemoConfig) -> dict:
    """The quality part, the cost table, one report.

    Args:
        config: what to run.

    Returns:
        `{"quality": quality.json's content (None with quality=False),
        "compare": the cost table's results (results.json), "report": path
        of report.md}`. A cost run that failed is marked in the results
        (`engine.succeeded`).

    Raises:
        ValueError: for too little corpus or no cost run left.
    """
    # The report's charts need matplotlib: say so before any compute.
    require("matplotlib.pyplot", extra="bench")
    started = time.perf_counter()
    backend = keras.backend.backend()
    os.makedirs(config.out, exist_ok=True)

    quality = None
    if config.quality:
        from keras_lora.recipes.quality import quality as run_quality

        print(
            f"== 1/2 quality: keras-lora's pretrained small GPT-2 fine-tuned on "
            f"Python code ({', '.join(config.quality_config().runs)}; {backend}) ==",
            flush=True,
        )
        quality = run_quality(config.quality_config())
        gc.collect()
        keras.backend.clear_session(free_memory=True)
    quality_seconds = time.perf_counter() - started

    runs = available_runs(config.runs)
    compare_dir = os.path.join(config.out, "compare")
    os.makedirs(compare_dir, exist_ok=True)
    tokens_path = os.path.join(compare_dir, "tokens.npy")
    needed_rows = (config.warmup + config.compare_steps + config.eval_batches) * (
        config.batch
    )
    write_tokens(config, tokens_path, needed_rows)

    print(
        f"\n== 2/2 cost: {', '.join(runs)} on the {config.arch} architecture ==",
        flush=True,
    )
    compare_config = CompareConfig(
        out=compare_dir,
        backends=(backend,),
        runs=tuple(runs),
        arch=config.arch,
        steps=config.compare_steps,
        warmup=config.warmup,
        eval_batches=config.eval_batches,
        inference_runs=config.inference_runs,
        tokens=tokens_path,
        batch=config.batch,
        seq=config.seq,
        learning_rate=config.learning_rate,
        seed=config.seed,
    )
    compare_config = dataclasses.replace(
        compare_config, command=compare_command(compare_config)
    )
    results = engine.compare(compare_config)

    seconds = time.perf_counter() - started
    report_path = write_report(config.out, compare_dir, seconds, quality_seconds)
    print(
        f"\ndemo finished in {seconds / 60:.1f} min (quality part "
        f"{quality_seconds / 60:.1f} min): report {report_path}; plots "
        f"{os.path.join(config.out, 'quality_loss.png')}, "
        f"{os.path.join(compare_dir, 'peak_memory.png')}"
    )
    return {"quality": quality, "compare": results, "report": report_path}


def compare_command(config: CompareConfig) -> str:
    """The `keras-lora compare` line that repeats the demo's cost table."""
    argv = ["keras-lora", "compare", "--arch", config.arch, "--backend"]
    argv += [*config.backends, "--runs", *config.runs]
    for name in (
        "steps",
        "warmup",
        "eval_batches",
        "inference_runs",
        "tokens",
        "batch",
        "seq",
    ):
        argv += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    argv += ["--learning-rate", str(config.learning_rate), "--seed", str(config.seed)]
    return shlex.join(argv + ["--out", config.out])


def available_runs(runs) -> list[str]:
    """`runs` without peft when torch, transformers or peft is missing."""
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


def write_tokens(config: DemoConfig, path: str, needed_rows: int) -> str:
    """Token windows of the code corpus for the cost table.

    Tokenized with the shipped base's tokenizer (4096 ids). An architecture
    with a smaller vocabulary (`--arch tiny`, 1024) gets the ids folded into
    it (modulo): its table measures cost, which no id changes.

    Returns:
        What the rows are, for the report.

    Raises:
        ValueError: when the corpus gives fewer than `needed_rows` windows;
            nothing is written then.
    """
    import keras_hub
    import numpy as np

    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=os.path.join(pretrain.ASSETS, "vocab.json"),
        merges=os.path.join(pretrain.ASSETS, "merges.txt"),
    )
    chars = needed_rows * (config.seq + 1) * CHARS_PER_TOKEN
    texts, _ = data.python_code_split(max_chars=chars)
    rows = tokenization.token_windows(
        texts, tokenizer, config.seq + 1, shuffle_seed=config.seed
    )
    if len(rows) < needed_rows:
        raise ValueError(
            f"the corpus gives {len(rows)} windows of {config.seq + 1} tokens; "
            f"the comparison needs {needed_rows} ((warmup + compare steps + "
            "eval batches) x batch): lower those"
        )
    vocabulary = models.architecture(config.arch).vocabulary_size
    rows = rows[:needed_rows] % vocabulary
    with open(path, "wb") as f:
        np.save(f, rows)
    return data.code_description()


def quality_section(out: str) -> list[str]:
    """The quality part's lines of report.md, if `quality.json` is there."""
    from keras_lora.recipes.quality_report import markdown

    path = os.path.join(out, "quality.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return markdown(json.load(f))


def write_report(
    out: str, compare_dir: str, seconds: float, quality_seconds: float = 0.0
) -> str:
    """`report.md`: the quality part and the cost table, one page.

    Args:
        out: the demo's directory (with `quality.json` unless skipped).
        compare_dir: the cost table's directory (with `results.md`).
        seconds: the demo's run time, for the page.
        quality_seconds: the quality part's share of it.

    Returns:
        The path of `report.md`.
    """
    import keras_hub

    import keras_lora

    with open(os.path.join(compare_dir, "results.md")) as f:
        comparison = f.read().split("\n", 1)[1].strip()  # Drop its title.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    lines = [
        "# keras-lora demo",
        "",
        f"Backend {keras.backend.backend()}; keras {keras.__version__}, keras-hub "
        f"{keras_hub.__version__}, keras-lora {keras_lora.__version__}, Python "
        f"{sys.version.split()[0]}; {os.cpu_count()} CPU cores"
        + (f" (load average {load:.1f} at the end)" if load is not None else "")
        + f"; {seconds / 60:.1f} min in all, quality part "
        f"{quality_seconds / 60:.1f} min.",
        "",
        *quality_section(out),
        "## Cost: full fine-tuning vs LoRA on the GPT-2 base architecture",
        "",
        "Time, memory and file sizes only matter at scale, so these runs use "
        "the GPT-2 base architecture with RANDOM weights (nothing can be "
        "downloaded here; its losses say nothing about quality, the section "
        "above does), each in its own process, on token windows of the same "
        "Python code corpus.",
        "",
        comparison,
        "",
        "![peak memory](compare/peak_memory.png)",
        "",
        "More charts: `compare/step_time.png`, `compare/tokens_per_s.png`.",
        "",
    ]
    path = os.path.join(out, "report.md")
    atomic_write(path, "\n".join(lines).encode("utf-8"))
    return path
