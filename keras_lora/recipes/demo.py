"""`keras-lora demo`: the offline main job, as one function.

0. Quality (`recipes.quality`): keras-lora's own small pretrained GPT-2
   (shipped in the package, `recipes.pretrain`) fine-tuned on Python source
   code with LoRA and with full fine-tuning: held-out losses before and
   after on the new domain and on the original one (forgetting),
   generations, `quality.json` and `quality_loss.png`.
1. A short LoRA fine-tune (rank 4, alpha 32, query/value) of a GPT-2
   architecture with random weights on the default corpus (Python
   standard-library docstrings, byte-level BPE tokenizer trained on it):
   writes the adapter, the random base preset, `run_report.json` and
   `training_loss.png` (`recipes.finetune`).
2. The comparison: full fine-tuning vs keras-lora vs keras-hub's
   `enable_lora` (and Hugging Face PEFT on torch when it is installed), each
   in its own process, on token windows of the same corpus, with held-out
   batches for quality (`bench.engine.compare`): writes
   `compare/results.{json,md}` and the memory, step-time and throughput
   charts.
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
import time

import keras

from keras_lora.bench import engine
from keras_lora.files import atomic_write
from keras_lora.recipes import data, models
from keras_lora.recipes.finetune import FinetuneConfig, finetune
from keras_lora.recipes.quality import QualityConfig
from keras_lora.recipes.training import first_and_last

COMPARE_RUNS = ("full", "lora", "builtin", "peft")
# The tiny model needs little text; reading and tokenizing all of the
# default corpus would be most of its run time.
TINY_DOCUMENTS = 400


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What `demo` runs; checked when made.

    Args:
        out: output directory.
        arch: the random-weight architecture (`recipes.models`).
        steps: fine-tuning steps.
        compare_steps: timed training steps of each comparison run.
        warmup: untimed steps before them (compilation).
        eval_batches: held-out batches for each comparison run's quality.
        runs: comparison runs (`COMPARE_RUNS`); peft is skipped when torch,
            transformers or peft is missing.
        batch, seq: texts per batch and tokens per text.
        learning_rate: AdamW's learning rate.
        max_documents: use at most this many documents of the corpus
            (default: all, or `TINY_DOCUMENTS` for the tiny architecture).
        vocab_size: vocabulary of the trained tokenizer.
        seed: seeds everything.
        verbose: `fit` verbosity of the fine-tune.
        quality: run the quality part first (`recipes.quality`).
        quality_steps, quality_batch, quality_seq, quality_eval_rows,
        quality_max_length: its `QualityConfig` steps, batch, seq,
            eval_rows and max_length.
    """

    out: str = os.path.join("runs", "demo")
    arch: str = "base"
    steps: int = 20
    compare_steps: int = 4
    warmup: int = 2
    eval_batches: int = 4
    runs: tuple[str, ...] = COMPARE_RUNS
    batch: int = 8
    seq: int = 128
    learning_rate: float = 5e-5
    max_documents: int | None = None
    vocab_size: int | None = None
    seed: int = 0
    verbose: int = 1
    quality: bool = True
    quality_steps: int = QualityConfig.steps
    quality_batch: int = QualityConfig.batch
    quality_seq: int = QualityConfig.seq
    quality_eval_rows: int = QualityConfig.eval_rows
    quality_max_length: int = QualityConfig.max_length

    def __post_init__(self):
        models.architecture(self.arch)
        self.quality_config()  # Checks the quality settings.
        bad = [r for r in self.runs if r not in COMPARE_RUNS]
        if bad or not self.runs:
            raise ValueError(
                f"unknown comparison run {bad or list(self.runs)}: choose from "
                f"{', '.join(COMPARE_RUNS)}"
            )
        for name in ("steps", "compare_steps", "warmup", "eval_batches", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        object.__setattr__(self, "runs", tuple(dict.fromkeys(self.runs)))

    def quality_config(self) -> QualityConfig:
        """The quality part's settings."""
        return QualityConfig(
            out=self.out,
            steps=self.quality_steps,
            batch=self.quality_batch,
            seq=self.quality_seq,
            eval_rows=self.quality_eval_rows,
            max_length=self.quality_max_length,
            eval_every=max(1, self.quality_steps // 6),
            seed=self.seed,
        )

    @property
    def documents(self) -> int | None:
        """The corpus size actually used."""
        if self.max_documents is None and self.arch == "tiny":
            return TINY_DOCUMENTS
        return self.max_documents


def demo(config: DemoConfig) -> dict:
    """Fine-tune, compare, report.

    Args:
        config: what to run.

    Returns:
        `{"finetune": the fine-tune's report, "compare": the comparison's
        results (results.json), "report": path of report.md}`. A comparison
        run that failed is marked in the results (`engine.succeeded`).

    Raises:
        ValueError: for too little corpus or no comparison run left.
    """
    started = time.perf_counter()
    backend = keras.backend.backend()
    runs = available_runs(config.runs)
    os.makedirs(config.out, exist_ok=True)
    needed_rows = (config.warmup + config.compare_steps + config.eval_batches) * (
        config.batch
    )

    quality = None
    if config.quality:
        from keras_lora.recipes.quality import quality as run_quality

        print(
            f"== 0/2 quality: LoRA vs full fine-tuning of keras-lora's pretrained "
            f"small GPT-2 on Python code ({backend}) ==",
            flush=True,
        )
        quality = run_quality(config.quality_config())
        gc.collect()
        keras.backend.clear_session(free_memory=True)

    print(f"== 1/2 LoRA fine-tune ({config.arch}, {backend}) ==", flush=True)
    run = finetune(
        FinetuneConfig(
            out=config.out,
            arch=config.arch,
            steps=config.steps,
            batch=config.batch,
            seq=config.seq,
            learning_rate=config.learning_rate,
            seed=config.seed,
            verbose=config.verbose,
            max_documents=config.documents,
            vocab_size=config.vocab_size,
        )
    )
    gc.collect()  # The fine-tuned model is gone; give its memory back.
    keras.backend.clear_session(free_memory=True)

    compare_dir = os.path.join(config.out, "compare")
    os.makedirs(compare_dir, exist_ok=True)
    tokens_path = os.path.join(compare_dir, "tokens.npy")
    write_tokens(config, tokens_path, needed_rows)

    print(f"\n== 2/2 full fine-tuning vs LoRA ({', '.join(runs)}) ==", flush=True)
    compare_config = engine.CompareConfig(
        out=compare_dir,
        backends=(backend,),
        runs=tuple(runs),
        arch=config.arch,
        steps=config.compare_steps,
        warmup=config.warmup,
        eval_batches=config.eval_batches,
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

    report_path = write_report(config.out, compare_dir, time.perf_counter() - started)
    print(
        f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} min: "
        f"adapter {os.path.join(config.out, 'adapter')}; report {report_path}; "
        f"plots {os.path.join(config.out, 'training_loss.png')}, "
        f"{os.path.join(compare_dir, 'peak_memory.png')}"
    )
    return {
        "quality": quality,
        "finetune": run,
        "compare": results,
        "report": report_path,
    }


def compare_command(config: engine.CompareConfig) -> str:
    """The `keras-lora compare` line that repeats the demo's comparison."""
    argv = ["keras-lora", "compare", "--arch", config.arch, "--backend"]
    argv += [*config.backends, "--runs", *config.runs]
    for name in ("steps", "warmup", "eval_batches", "tokens", "batch", "seq"):
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


def write_tokens(config: DemoConfig, path: str, needed_rows: int) -> None:
    """The corpus as token windows, with the fine-tune's tokenizer.

    Raises:
        ValueError: when the corpus gives fewer than `needed_rows` windows;
            nothing is written then.
    """
    import keras_hub
    import numpy as np

    tokenizer = keras_hub.models.GPT2Tokenizer.from_preset(
        os.path.join(config.out, "base_preset")
    )
    texts = data.default_corpus(max_documents=config.documents)
    rows = data.token_windows(
        texts, tokenizer, config.seq + 1, shuffle_seed=config.seed
    )
    if len(rows) < needed_rows:
        raise ValueError(
            f"the corpus gives {len(rows)} windows of {config.seq + 1} tokens; "
            f"the comparison needs {needed_rows} ((warmup + compare steps + "
            "eval batches) x batch): lower those or drop --max-documents"
        )
    with open(path, "wb") as f:
        np.save(f, rows[:needed_rows])


def quality_section(out: str) -> list[str]:
    """The quality part's lines of report.md, if `quality.json` is there."""
    from keras_lora.recipes.quality import markdown

    path = os.path.join(out, "quality.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return markdown(json.load(f))


def write_report(out: str, compare_dir: str, seconds: float) -> str:
    """`report.md`: the fine-tune's summary and the comparison, one page.

    Args:
        out: the demo's directory (with `run_report.json`).
        compare_dir: the comparison's directory (with `results.md`).
        seconds: the demo's run time, for the page.

    Returns:
        The path of `report.md`.
    """
    with open(os.path.join(out, "run_report.json")) as f:
        run = json.load(f)
    with open(os.path.join(compare_dir, "results.md")) as f:
        comparison = f.read().split("\n", 1)[1].strip()  # Drop its title.
    losses = run["loss_per_step"]
    head, tail = first_and_last(losses)
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
        *quality_section(out),
        "## Cost: LoRA fine-tune of a random-weight architecture",
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
