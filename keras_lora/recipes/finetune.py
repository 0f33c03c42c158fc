"""The LoRA fine-tune as a function: `finetune(FinetuneConfig(...))`.

Loads a GPT-2 (a preset, or a random-weight architecture with a tokenizer
trained on the corpus), wraps it with LoRA, trains it, and writes into
`config.out`: `adapter/`, `base_preset/` (random weights only: an adapter
means something only on the weights it was trained on), `run_report.json`
and `training_loss.png`. The report dict is returned too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import keras

from keras_lora.families import GPT2
from keras_lora.recipes import data as data_lib
from keras_lora.recipes import models, tokenization, training

DEFAULT_PROMPTS = ("I like basketball", "That Italian restaurant is")
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16", "bfloat16")
BUILTIN_DATA = ("default", "reddit_tifu")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything `finetune` needs; checked when made.

    Args:
        out: output directory.
        preset: keras-hub preset name, local Keras preset or Hugging Face
            GPT-2 directory. Exactly one of `preset` and `arch`.
        arch: a random-weight architecture (`models.ARCHITECTURES`).
        tokenizer: a directory with vocab.json and merges.txt, overriding
            the preset's tokenizer or the one trained for `arch`.
        vocab_size: vocabulary of the tokenizer trained for `arch` (default:
            1024 for tiny, 8192 otherwise).
        data: "default" (standard-library docstrings, offline),
            "reddit_tifu" (tensorflow-datasets) or a text file or folder.
        data_dir: tensorflow-datasets data_dir for reddit_tifu.
        download: let tensorflow-datasets download reddit_tifu.
        paragraphs: for a text path, one document per paragraph.
        max_documents: use at most this many documents.
        rank, alpha, dropout, targets: the LoRA settings.
        batch: texts per batch.
        seq: tokens per text.
        steps: batches to train; None with `epochs`.
        epochs: whole passes over the data instead of `steps`.
        learning_rate: AdamW's learning rate.
        dtype_policy: a Keras dtype policy name.
        prompts: prompts for the before/after generations.
        max_length: generation length.
        seed: seeds weights, LoRA factors and shuffling.
        save_base: for `arch`, save the random base weights as a preset.
        verbose: `fit` verbosity.
    """

    out: str
    preset: str | None = None
    arch: str | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    data: str = "default"
    data_dir: str | None = None
    download: bool = False
    paragraphs: bool = False
    max_documents: int | None = None
    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = GPT2.default_targets
    batch: int = 8
    seq: int = 128
    steps: int | None = 20
    epochs: int | None = None
    learning_rate: float = 5e-5
    dtype_policy: str = "float32"
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_length: int = 40
    seed: int = 0
    save_base: bool = True
    verbose: int = 1

    def __post_init__(self):
        if (self.preset is None) == (self.arch is None):
            raise ValueError("pass exactly one of preset and arch")
        if self.arch is not None:
            models.architecture(self.arch)
        if self.steps is not None and self.epochs is not None:
            raise ValueError("pass steps or epochs, not both")
        for name in ("vocab_size", "max_documents", "steps", "epochs"):
            _check_int(name, getattr(self, name), allow_none=True)
        for name in ("rank", "batch", "seq", "max_length"):
            _check_int(name, getattr(self, name))
        if not self.alpha > 0 or not self.learning_rate > 0:
            raise ValueError("alpha and learning_rate must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype_policy not in DTYPE_POLICIES:
            raise ValueError(
                f"dtype_policy {self.dtype_policy!r}: choose from "
                f"{', '.join(DTYPE_POLICIES)}"
            )
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"targets must be a non-empty tuple, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "prompts", tuple(self.prompts))


def _check_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def finetune(config: FinetuneConfig) -> dict:
    """LoRA fine-tuning; writes the adapter, report and plot into `config.out`.

    The global Keras dtype policy is restored afterwards.

    Args:
        config: what to train.

    Returns:
        The report (also written as `run_report.json`).

    Raises:
        FileNotFoundError: for a missing preset, tokenizer or data path.
        ValueError: for bad targets, too little data or a model that does
            not load; nothing is written then.
    """
    policy = keras.config.dtype_policy()
    try:
        return _finetune(config)
    finally:  # In-process callers (tests, notebooks) keep their policy.
        keras.config.set_dtype_policy(policy)


def _load_data(config: FinetuneConfig):
    """`(texts or None, dataset or None, description)` for `config.data`."""
    if config.data == "default":
        texts = data_lib.default_corpus(max_documents=config.max_documents)
        return texts, None, data_lib.corpus_description()
    if config.data == "reddit_tifu":
        ds = data_lib.reddit_tifu_dataset(
            batch_size=config.batch, data_dir=config.data_dir, download=config.download
        )
        return None, ds, "reddit_tifu train split (tensorflow-datasets)"
    split = "paragraph" if config.paragraphs else "file"
    texts = data_lib.text_corpus(config.data, split=split)
    if config.max_documents:
        texts = texts[: config.max_documents]
    where = os.path.abspath(config.data)
    return texts, None, f"text {where} (one document per {split})"


def _model(config: FinetuneConfig, texts, dataset):
    """`(lm, architecture config or None, weights label, tokenizer label)`."""
    if config.preset is not None:
        lm, labels = models.load_task(config.preset, config.seq, config.tokenizer)
        return lm, None, labels["weights"], labels["tokenizer"]
    if config.tokenizer:
        tokenizer = models.tokenizer_from_dir(config.tokenizer)
        tokenizer_label = f"GPT-2 BPE from {os.path.abspath(config.tokenizer)}"
    else:
        sample = texts if texts is not None else data_lib.dataset_texts(dataset)
        vocab = config.vocab_size or (1024 if config.arch == "tiny" else 8192)
        tokenizer = tokenization.train_tokenizer(sample[:2000], vocabulary_size=vocab)
        tokenizer_label = (
            f"byte-level BPE trained on the corpus "
            f"({tokenizer.vocabulary_size()} tokens, asked {vocab})"
        )
    lm, arch_config = models.random_task(
        config.arch, tokenizer, config.seq, config.seed
    )
    shape = models.architecture(config.arch)
    return lm, arch_config, f"RANDOM weights, {shape.label}", tokenizer_label


def _finetune(config: FinetuneConfig) -> dict:
    from keras_lora import (
        inject_lora,
        print_trainable_parameters,
        save_adapter,
        target_layers,
        trainable_summary,
    )
    from keras_lora.callbacks import GPUMemoryCallback
    from keras_lora.files import atomic_write

    models.check_path(config.tokenizer, "tokenizer")
    if config.data not in BUILTIN_DATA and not os.path.exists(config.data):
        raise FileNotFoundError(
            f"data {config.data!r}: no such file or folder (or use 'default' "
            "or 'reddit_tifu')"
        )
    if config.preset:
        models.describe_preset(config.preset)  # Fails early on a missing dir.

    started = time.perf_counter()
    if config.dtype_policy != "float32":
        keras.config.set_dtype_policy(config.dtype_policy)
    texts, dataset, data_label = _load_data(config)
    steps = None if config.epochs else config.steps
    if texts is not None and steps is not None and len(texts) < config.batch:
        raise ValueError(
            f"the corpus has {len(texts)} documents, fewer than batch "
            f"{config.batch}: lower the batch or add text"
        )
    lm, arch_config, weights_label, tokenizer_label = _model(config, texts, dataset)
    print(f"weights:   {weights_label}")
    print(f"tokenizer: {tokenizer_label}")
    print(f"data:      {data_label}")

    target_layers(lm, config.targets)  # Bad targets fail before any write.
    os.makedirs(config.out, exist_ok=True)
    base_preset = None
    if config.arch and config.save_base:
        base_preset = os.path.join(config.out, "base_preset")
        lm.save_to_preset(base_preset)

    if texts is not None:
        dataset = tokenization.text_dataset(
            texts, config.batch, repeat=steps is not None, shuffle_seed=config.seed
        )
    elif steps is not None:
        dataset = dataset.repeat()

    inject_lora(
        lm,
        rank=config.rank,
        alpha=config.alpha,
        targets=config.targets,
        dropout=config.dropout,
        seed=config.seed,
    )
    print_trainable_parameters(lm)
    counts = trainable_summary(lm)
    optimizer, loss = training.optimizer_and_loss(config.learning_rate)
    lm.compile(
        optimizer=optimizer, loss=loss, weighted_metrics=["accuracy"], sampler="greedy"
    )
    prompts = list(config.prompts)
    # A fresh adapter is a no-op (B = 0): these are the base model's outputs.
    before = models.generate(lm, prompts, config.max_length)
    _print_generations("before fine-tuning (greedy)", prompts, before)

    log = training.StepLog()
    memory = GPUMemoryCallback(target_batches=[5, 10, 25, 50, 100, 200, 500])
    fit_started = time.perf_counter()
    history = lm.fit(
        dataset,
        epochs=config.epochs or 1,
        steps_per_epoch=steps,
        callbacks=[log, memory],
        shuffle=False,  # The dataset is shuffled already (tf.data).
        verbose=config.verbose,
    )
    fit_seconds = time.perf_counter() - fit_started

    after = models.generate(lm, prompts, config.max_length)
    _print_generations("after fine-tuning (greedy)", prompts, after)
    adapter_dir = save_adapter(lm, os.path.join(config.out, "adapter"))

    report = {
        "command": "keras-lora finetune",
        "backend": keras.backend.backend(),
        "versions": versions(),
        "weights": weights_label,
        "architecture": arch_config,
        "tokenizer": tokenizer_label,
        "data": data_label,
        "num_documents": len(texts) if texts is not None else None,
        "dtype_policy": config.dtype_policy,
        "lora": {
            "rank": config.rank,
            "alpha": config.alpha,
            "dropout": config.dropout,
            "targets": list(config.targets),
        },
        "batch": config.batch,
        "sequence_length": config.seq,
        "steps": steps,
        "epochs": config.epochs or 1,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "parameters": counts,
        "loss_per_step": log.losses,
        "loss_per_step_running_mean": log.running_means,
        "loss_per_epoch": [float(v) for v in history.history.get("loss", [])],
        "accuracy_per_epoch": [float(v) for v in history.history.get("accuracy", [])],
        "fit_seconds": round(fit_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "peak_memory_gb": memory.peak_usage,
        "memory_device": memory.device,
        "prompts": prompts,
        "generations_before": before,
        "generations_after": after,
        "adapter": os.path.abspath(adapter_dir),
        "base_preset": os.path.abspath(base_preset) if base_preset else config.preset,
    }
    report_path = os.path.join(config.out, "run_report.json")
    atomic_write(report_path, json.dumps(report, indent=2).encode("utf-8"))
    plot_path = training.plot_losses(
        log.losses,
        os.path.join(config.out, "training_loss.png"),
        title=f"LoRA fine-tune: {weights_label}\n{data_label}",
    )
    first, last = training.first_and_last(log.losses)
    print(
        f"\nloss (mean of first / last {len(last)} steps) "
        f"{sum(first) / len(first):.4f} -> {sum(last) / len(last):.4f} "
        f"in {fit_seconds:.1f} s; adapter {adapter_dir}; report {report_path}"
        + (f"; plot {plot_path}" if plot_path else "")
    )
    if base_preset:
        print(f"base weights (random) saved as preset {base_preset}")
    return report


def _print_generations(title: str, prompts, outputs) -> None:
    print(f"\n--- {title} ---")
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"[{prompt}] -> {output!r}")


def versions() -> dict:
    """Versions of keras-lora, Keras, keras-hub and Python, for reports."""
    import keras_hub

    import keras_lora

    return {
        "keras_lora": keras_lora.__version__,
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "python": sys.version.split()[0],
    }
