"""The `keras-lora` command: fine-tune, merge, generate, compare, PEFT files.

    keras-lora demo                          # the offline main job (~5 min)
    keras-lora finetune --arch tiny --steps 20 --out runs/tiny
    keras-lora generate --preset runs/tiny/base_preset \\
        --adapter runs/tiny/adapter --prompt "The module"
    keras-lora merge --preset runs/tiny/base_preset \\
        --adapter runs/tiny/adapter --out runs/tiny/merged
    keras-lora export-peft --preset BASE --adapter ADAPTER --out PEFT_DIR
    keras-lora import-peft --preset BASE --peft PEFT_DIR --out ADAPTER
    keras-lora compare --tiny --steps 2      # benchmarks/benchmark.py options

Models: a keras-hub preset name (downloads need network), a local Keras
preset directory, a local Hugging Face GPT-2 directory (config.json +
model.safetensors, plus vocab.json + merges.txt for the tokenizer), or, for
`finetune`, a random-weight architecture (`--arch tiny|gpt2-base-random`)
with a byte-level BPE tokenizer trained on the corpus. Every output says
which weights, tokenizer and data were used.

Errors (bad arguments, missing files, unreadable adapters) print one line on
stderr and exit non-zero: 2 for bad arguments, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

# keras_lora (the package this module is in) imports Keras already.
import keras

PROG = "keras-lora"
DEFAULT_PROMPTS = ("I like basketball", "That Italian restaurant is")
ARCHITECTURES = {
    # vocabulary_size None: the trained tokenizer's size.
    "tiny": dict(
        vocabulary_size=None,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=256,
    ),
    # The published GPT-2 base shapes (so parameter counts match GPT-2's:
    # 147,456 LoRA parameters at rank 4 on query/value).
    "gpt2-base-random": dict(
        vocabulary_size=50257,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        intermediate_dim=3072,
        max_sequence_length=1024,
    ),
}
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16", "bfloat16")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `keras-lora` (all subcommands)."""
    parser = _Parser(
        prog=PROG,
        description="LoRA fine-tuning of keras-hub GPT-2 models with keras-lora.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    ft = sub.add_parser(
        "finetune",
        help="LoRA fine-tune a GPT-2; save the adapter.",
        formatter_class=fmt,
    )
    model = ft.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--preset",
        help="keras-hub preset name, local Keras preset dir or local Hugging "
        "Face GPT-2 dir.",
    )
    model.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        help="a random-weight GPT-2 architecture (offline; tokenizer trained "
        "on the corpus unless --tokenizer).",
    )
    ft.add_argument(
        "--tokenizer",
        help="directory with a GPT-2 vocab.json and merges.txt (overrides the "
        "preset's tokenizer, or the trained one for --arch).",
    )
    ft.add_argument(
        "--vocab-size",
        type=positive_int,
        help="vocabulary of the tokenizer trained for --arch "
        "(default 1024 for tiny, 8192 otherwise).",
    )
    ft.add_argument(
        "--data",
        default="default",
        help="'default' (Python standard-library docstrings, offline), "
        "'reddit_tifu' (tensorflow-datasets; must be prepared), or a text "
        "file or folder.",
    )
    ft.add_argument("--data-dir", help="tensorflow-datasets data_dir for reddit_tifu.")
    ft.add_argument(
        "--download",
        action="store_true",
        help="for reddit_tifu: let tensorflow-datasets download and prepare "
        "it first (needs network, ~640 MB).",
    )
    ft.add_argument(
        "--paragraphs",
        action="store_true",
        help="for a text path: one document per blank-line-separated paragraph.",
    )
    ft.add_argument(
        "--max-documents",
        type=positive_int,
        help="use at most this many documents of the corpus.",
    )
    ft.add_argument("--rank", type=positive_int, default=4)
    ft.add_argument("--alpha", type=positive_float, default=32.0)
    ft.add_argument("--dropout", type=_dropout, default=0.0)
    ft.add_argument(
        "--targets",
        nargs="+",
        default=["query", "value"],
        help="layer names, path suffixes or regexes to adapt.",
    )
    ft.add_argument("--batch", type=positive_int, default=8)
    ft.add_argument("--seq", type=positive_int, default=128, help="tokens per text.")
    length = ft.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=positive_int, help="train this many batches (default 20)."
    )
    length.add_argument(
        "--epochs", type=positive_int, help="train whole passes over the data."
    )
    ft.add_argument("--learning-rate", type=positive_float, default=5e-5)
    ft.add_argument("--dtype-policy", choices=DTYPE_POLICIES, default="float32")
    ft.add_argument(
        "--prompt",
        action="append",
        help="prompt for the sample generations (repeatable; default: the "
        "keras.io example's two).",
    )
    ft.add_argument(
        "--max-length", type=positive_int, default=40, help="generation length."
    )
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument(
        "--no-save-base",
        action="store_true",
        help="for --arch: do not save the random base weights (an adapter "
        "is only usable on the weights it was trained on).",
    )
    ft.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=1, help="fit verbosity."
    )
    ft.add_argument("--out", required=True, help="output directory.")

    gen = sub.add_parser("generate", help="Generate text.", formatter_class=fmt)
    _add_base(gen)
    gen.add_argument("--adapter", help="adapter directory (save_adapter format).")
    gen.add_argument("--prompt", action="append", required=True, help="repeatable.")
    gen.add_argument("--max-length", type=positive_int, default=40)
    gen.add_argument("--merge", action="store_true", help="merge before generating.")

    mg = sub.add_parser(
        "merge", help="Merge an adapter into a new local preset.", formatter_class=fmt
    )
    _add_base(mg)
    mg.add_argument("--adapter", required=True, help="adapter directory.")
    mg.add_argument("--out", required=True, help="new preset directory.")

    ex = sub.add_parser(
        "export-peft", help="Write an adapter as a Hugging Face PEFT adapter."
    )
    _add_base(ex)
    ex.add_argument("--adapter", required=True, help="adapter directory.")
    ex.add_argument("--out", required=True, help="PEFT adapter directory.")
    ex.add_argument(
        "--base-model-name", help="base_model_name_or_path for adapter_config.json."
    )

    im = sub.add_parser("import-peft", help="Read a Hugging Face PEFT GPT-2 adapter.")
    _add_base(im)
    im.add_argument("--peft", required=True, help="PEFT adapter directory.")
    im.add_argument("--out", required=True, help="adapter directory to write.")

    dm = sub.add_parser(
        "demo",
        help="The offline main job: a short LoRA fine-tune, then full "
        "fine-tuning vs LoRA (table, charts, report).",
        formatter_class=fmt,
    )
    from keras_lora import demo as demo_lib

    demo_lib.add_arguments(dm)

    # Handled before parsing (see main): every option goes to the benchmark.
    sub.add_parser(
        "compare",
        add_help=False,
        help="Full fine-tuning vs keras-lora vs built-in LoRA "
        "(benchmarks/benchmark.py; `compare --help` for its options).",
    )
    return parser


def _add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        required=True,
        help="base model: keras-hub preset name, local Keras preset dir or "
        "local Hugging Face GPT-2 dir.",
    )
    parser.add_argument("--tokenizer", help="directory with vocab.json and merges.txt.")
    parser.add_argument(
        "--seq", type=positive_int, default=128, help="preprocessor length."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run `keras-lora`; returns the exit status.

    Args:
        argv: the arguments (without the program name); default `sys.argv`.

    Example:

    >>> main(["finetune", "--arch", "tiny", "--steps", "2", "--out", "run"])
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _safely(compare, argv[1:])
    args = build_parser().parse_args(argv)
    command = {
        "finetune": finetune,
        "generate": generate,
        "merge": merge,
        "export-peft": export_peft_command,
        "import-peft": import_peft_command,
        "demo": demo_command,
    }[args.command]
    return _safely(command, args)


def _safely(function, args) -> int:
    """Run a command; expected failures become one line on stderr."""
    try:
        return function(args) or 0
    except (ValueError, OSError) as error:  # FileNotFoundError is an OSError.
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- models


def _check_path(path: str | None, what: str, is_dir: bool = True) -> None:
    if path is None:
        return
    ok = os.path.isdir(path) if is_dir else os.path.exists(path)
    if not ok:
        kind = "directory" if is_dir else "file"
        raise FileNotFoundError(f"{what} {kind} {path!r} does not exist")


def _looks_like_path(preset: str) -> bool:
    return os.sep in preset or preset.startswith(".") or os.path.exists(preset)


def describe_preset(preset: str) -> str:
    """Which weights `preset` means, for the outputs."""
    if not _looks_like_path(preset):
        return f"keras-hub preset {preset!r} (pretrained weights)"
    if not os.path.isdir(preset):
        raise FileNotFoundError(f"model directory {preset!r} does not exist")
    config_path = os.path.join(preset, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{preset!r} is not a model directory: no config.json (pass a "
            "keras-hub preset name, a Keras preset dir or a Hugging Face GPT-2 dir)"
        )
    with open(config_path) as f:
        config = json.load(f)
    if "class_name" in config:
        return f"local Keras preset {os.path.abspath(preset)}"
    return f"local Hugging Face GPT-2 {os.path.abspath(preset)}"


def _tokenizer_from_dir(path: str):
    import keras_hub

    _check_path(path, "tokenizer")
    files = [os.path.join(path, name) for name in ("vocab.json", "merges.txt")]
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"tokenizer directory {path!r} lacks {os.path.basename(file)} "
                "(a GPT-2 tokenizer needs vocab.json and merges.txt)"
            )
    return keras_hub.models.GPT2Tokenizer(vocabulary=files[0], merges=files[1])


def load_task(preset: str, sequence_length: int = 128, tokenizer: str | None = None):
    """A `GPT2CausalLM` and a description of its weights and tokenizer.

    Args:
        preset: keras-hub preset name, local Keras preset or Hugging Face dir.
        sequence_length: the preprocessor's sequence length.
        tokenizer: a directory with vocab.json and merges.txt, overriding the
            preset's tokenizer.

    Returns:
        `(lm, {"weights": ..., "tokenizer": ...})`.
    """
    import keras_hub

    weights = describe_preset(preset)
    if tokenizer is not None:
        tok = _tokenizer_from_dir(tokenizer)
        tokenizer_label = f"GPT-2 BPE from {os.path.abspath(tokenizer)}"
    else:
        try:
            tok = keras_hub.models.GPT2Tokenizer.from_preset(preset)
        except Exception as error:
            raise ValueError(
                f"cannot load a tokenizer from {preset!r} "
                f"({type(error).__name__}: {error}); for a Hugging Face dir "
                "add vocab.json and merges.txt, or pass --tokenizer DIR"
            ) from error
        tokenizer_label = f"the preset's tokenizer ({preset})"
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tok, sequence_length=sequence_length
    )
    try:
        lm = keras_hub.models.GPT2CausalLM.from_preset(
            preset, preprocessor=preprocessor
        )
    except (ValueError, OSError):
        raise
    except Exception as error:  # Network and format errors of keras-hub.
        raise ValueError(
            f"cannot load model {preset!r}: {type(error).__name__}: {error}"
        ) from error
    return lm, {"weights": weights, "tokenizer": tokenizer_label}


def random_task(arch: str, tokenizer, sequence_length: int, seed: int):
    """A `GPT2CausalLM` with random weights of architecture `arch`."""
    import keras_hub

    config = dict(ARCHITECTURES[arch])
    if config["vocabulary_size"] is None:
        config["vocabulary_size"] = tokenizer.vocabulary_size()
    elif tokenizer.vocabulary_size() > config["vocabulary_size"]:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocabulary_size()} tokens, more "
            f"than architecture {arch!r} embeds ({config['vocabulary_size']})"
        )
    if sequence_length > config["max_sequence_length"]:
        raise ValueError(
            f"--seq {sequence_length} exceeds the {arch} architecture's "
            f"max_sequence_length {config['max_sequence_length']}"
        )
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(**config)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    return lm, config


# ---------------------------------------------------------------- finetune


def _load_data(args):
    """`(texts or None, dataset or None, description)` for `--data`."""
    from keras_lora import data

    if args.data == "default":
        texts = data.default_corpus(max_documents=args.max_documents)
        return texts, None, data.corpus_description()
    if args.data == "reddit_tifu":
        ds = data.reddit_tifu_dataset(
            batch_size=args.batch, data_dir=args.data_dir, download=args.download
        )
        return None, ds, "reddit_tifu train split (tensorflow-datasets)"
    split = "paragraph" if args.paragraphs else "file"
    texts = data.text_corpus(args.data, split=split)
    if args.max_documents:
        texts = texts[: args.max_documents]
    return texts, None, f"text {os.path.abspath(args.data)} (one document per {split})"


def _optimizer_and_loss(learning_rate: float):
    """AdamW and cross-entropy exactly as in the keras.io example."""

    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=0.01,
        epsilon=1e-6,
        global_clipnorm=1.0,
    )
    for name in ("bias", "gamma", "beta"):
        optimizer.exclude_from_weight_decay(var_names=[name])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return optimizer, loss


def _generate(lm, prompts, max_length: int) -> list[str]:
    # No stop token: a random or briefly trained model may emit
    # <|endoftext|> first, and a fixed length shows more of what it learned.
    outputs = lm.generate(list(prompts), max_length=max_length, stop_token_ids=None)
    return [str(o) for o in outputs]


def _print_generations(title: str, prompts, outputs) -> None:
    print(f"\n--- {title} ---")
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"[{prompt}] -> {output!r}")


def finetune(args) -> int:
    """`keras-lora finetune`: LoRA fine-tuning; writes adapter + report."""
    policy = keras.config.dtype_policy()
    try:
        return _finetune(args)
    finally:  # In-process callers (tests, notebooks) keep their policy.
        keras.config.set_dtype_policy(policy)


def _finetune(args) -> int:
    if args.tokenizer:
        _check_path(args.tokenizer, "tokenizer")
    if args.data not in ("default", "reddit_tifu") and not os.path.exists(args.data):
        raise FileNotFoundError(
            f"--data {args.data!r}: no such file or folder (or use 'default' "
            "or 'reddit_tifu')"
        )
    if args.preset:
        describe_preset(args.preset)  # Fails early on a missing directory.

    from keras_lora import data as data_lib
    from keras_lora import (
        inject_lora,
        print_trainable_parameters,
        save_adapter,
        target_layers,
        trainable_summary,
    )
    from keras_lora.callbacks import GPUMemoryCallback
    from keras_lora.files import atomic_write

    started = time.perf_counter()
    if args.dtype_policy != "float32":
        keras.config.set_dtype_policy(args.dtype_policy)
    texts, dataset, data_label = _load_data(args)
    steps = None if args.epochs else (args.steps or 20)
    if texts is not None and steps is not None and len(texts) < args.batch:
        raise ValueError(
            f"the corpus has {len(texts)} documents, fewer than --batch "
            f"{args.batch}: lower --batch or add text"
        )

    arch_config = None
    if args.arch:
        if args.tokenizer:
            tokenizer = _tokenizer_from_dir(args.tokenizer)
            tokenizer_label = f"GPT-2 BPE from {os.path.abspath(args.tokenizer)}"
        else:
            sample = texts if texts is not None else data_lib.dataset_texts(dataset)
            vocab = args.vocab_size or (1024 if args.arch == "tiny" else 8192)
            tokenizer = data_lib.train_tokenizer(sample[:2000], vocabulary_size=vocab)
            tokenizer_label = (
                f"byte-level BPE trained on the corpus "
                f"({tokenizer.vocabulary_size()} tokens, asked {vocab})"
            )
        lm, arch_config = random_task(args.arch, tokenizer, args.seq, args.seed)
        size = args.arch.removeprefix("gpt2-").removesuffix("-random")
        weights_label = f"RANDOM weights, GPT-2 {size} architecture"
    else:
        lm, labels = load_task(args.preset, args.seq, args.tokenizer)
        weights_label, tokenizer_label = labels["weights"], labels["tokenizer"]
    print(f"weights:   {weights_label}")
    print(f"tokenizer: {tokenizer_label}")
    print(f"data:      {data_label}")

    target_layers(lm, tuple(args.targets))  # Bad targets fail before any write.
    os.makedirs(args.out, exist_ok=True)
    base_preset = None
    if args.arch and not args.no_save_base:
        # The adapter only means something on these exact random weights.
        base_preset = os.path.join(args.out, "base_preset")
        lm.save_to_preset(base_preset)

    if texts is not None:
        dataset = data_lib.text_dataset(
            texts, args.batch, repeat=steps is not None, shuffle_seed=args.seed
        )
    elif steps is not None:
        dataset = dataset.repeat()

    inject_lora(
        lm,
        rank=args.rank,
        alpha=args.alpha,
        targets=args.targets,
        dropout=args.dropout,
        seed=args.seed,
    )
    print_trainable_parameters(lm)
    counts = trainable_summary(lm)
    optimizer, loss = _optimizer_and_loss(args.learning_rate)
    lm.compile(
        optimizer=optimizer,
        loss=loss,
        weighted_metrics=["accuracy"],
        sampler="greedy",
    )
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    # A fresh adapter is a no-op (B = 0): these are the base model's outputs.
    before = _generate(lm, prompts, args.max_length)
    _print_generations("before fine-tuning (greedy)", prompts, before)

    step_losses = _StepLosses()
    memory = GPUMemoryCallback(target_batches=[5, 10, 25, 50, 100, 200, 500])
    fit_started = time.perf_counter()
    history = lm.fit(
        dataset,
        epochs=args.epochs or 1,
        steps_per_epoch=steps,
        callbacks=[step_losses, memory],
        shuffle=False,  # The dataset is shuffled already (tf.data).
        verbose=args.verbose,
    )
    fit_seconds = time.perf_counter() - fit_started

    after = _generate(lm, prompts, args.max_length)
    _print_generations("after fine-tuning (greedy)", prompts, after)
    adapter_dir = save_adapter(lm, os.path.join(args.out, "adapter"))

    report = {
        "command": "keras-lora finetune",
        "backend": keras.backend.backend(),
        "versions": _versions(),
        "weights": weights_label,
        "architecture": arch_config,
        "tokenizer": tokenizer_label,
        "data": data_label,
        "num_documents": len(texts) if texts is not None else None,
        "dtype_policy": args.dtype_policy,
        "lora": {
            "rank": args.rank,
            "alpha": args.alpha,
            "dropout": args.dropout,
            "targets": list(args.targets),
        },
        "batch": args.batch,
        "sequence_length": args.seq,
        "steps": steps,
        "epochs": args.epochs or 1,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "parameters": counts,
        "loss_per_step": step_losses.losses,
        "loss_per_step_running_mean": step_losses.running_means,
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
        "base_preset": os.path.abspath(base_preset) if base_preset else args.preset,
    }
    report_path = os.path.join(args.out, "run_report.json")
    atomic_write(report_path, json.dumps(report, indent=2).encode("utf-8"))
    plot_path = plot_losses(
        step_losses.losses,
        os.path.join(args.out, "training_loss.png"),
        title=f"LoRA fine-tune: {weights_label}\n{data_label}",
    )
    first, last = first_and_last(step_losses.losses)
    print(
        f"\nloss (mean of first / last {len(last)} steps) "
        f"{sum(first) / len(first):.4f} -> {sum(last) / len(last):.4f} "
        f"in {fit_seconds:.1f} s; adapter {adapter_dir}; report {report_path}"
        + (f"; plot {plot_path}" if plot_path else "")
    )
    if base_preset:
        print(f"base weights (random) saved as preset {base_preset}")
    return 0


def first_and_last(losses: list[float], most: int = 5):
    """The first and last steps to average, never overlapping (when 2+)."""
    k = max(1, min(most, len(losses) // 2))
    return losses[:k], losses[-k:]


def plot_losses(losses: list[float], path: str, title: str) -> str | None:
    """Loss per step and its running mean as a PNG; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("(no training_loss.png: pip install matplotlib to get one)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = range(1, len(losses) + 1)
    running = [sum(losses[:k]) / k for k in steps]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, marker=".", label="loss of the step")
    ax.plot(steps, running, label="running mean")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _StepLosses(keras.callbacks.Callback):
    """Per-step losses, recovered from Keras's running mean of the epoch.

    Keras 3 logs the mean loss of the epoch so far at each batch; with
    batches of equal size the loss of batch k is k·m_k - (k-1)·m_(k-1).
    """

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []
        self.running_means: list[float] = []
        self._previous = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._previous = 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self.running_means.append(mean)
        self.losses.append((batch + 1) * mean - batch * self._previous)
        self._previous = mean


def _versions() -> dict:
    import keras_hub

    import keras_lora

    return {
        "keras_lora": keras_lora.__version__,
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "python": sys.version.split()[0],
    }


# ---------------------------------------------------------------- others


def _load_with_adapter(args, adapter: str | None):
    _check_path(adapter, "adapter")
    lm, labels = load_task(args.preset, args.seq, args.tokenizer)
    if adapter:
        from keras_lora import load_adapter

        load_adapter(lm, adapter)
    return lm, labels


def generate(args) -> int:
    """`keras-lora generate`: base model (+ adapter) text generation."""
    lm, labels = _load_with_adapter(args, args.adapter)
    if args.merge and args.adapter:
        from keras_lora import merge_lora

        merge_lora(lm)
    lm.compile(sampler="greedy")
    print(f"weights: {labels['weights']}; tokenizer: {labels['tokenizer']}")
    print(f"adapter: {args.adapter or 'none'}")
    outputs = _generate(lm, args.prompt, args.max_length)
    for output in outputs:
        print(output)
    return 0


def merge(args) -> int:
    """`keras-lora merge`: base + adapter -> a merged local preset."""
    from keras_lora import lora_layers, merge_lora

    lm, labels = _load_with_adapter(args, args.adapter)
    n = len(lora_layers(lm))
    merge_lora(lm)
    lm.save_to_preset(args.out)
    print(
        f"merged {n} LoRA layers of {args.adapter} into {labels['weights']}; "
        f"wrote preset {os.path.abspath(args.out)} "
        "(load with keras_hub.models.GPT2CausalLM.from_preset)"
    )
    return 0


def export_peft_command(args) -> int:
    """`keras-lora export-peft`: adapter -> Hugging Face PEFT directory."""
    from keras_lora import export_peft

    lm, _ = _load_with_adapter(args, args.adapter)
    path = export_peft(lm, args.out, base_model_name_or_path=args.base_model_name)
    print(f"wrote PEFT adapter {os.path.abspath(path)}")
    return 0


def import_peft_command(args) -> int:
    """`keras-lora import-peft`: Hugging Face PEFT directory -> adapter."""
    from keras_lora import import_peft, lora_layers, save_adapter

    _check_path(args.peft, "PEFT adapter")
    lm, _ = load_task(args.preset, args.seq, args.tokenizer)
    import_peft(lm, args.peft)
    path = save_adapter(lm, args.out)
    print(
        f"imported {len(lora_layers(lm))} LoRA layers from {args.peft}; "
        f"wrote adapter {os.path.abspath(path)}"
    )
    return 0


def demo_command(args) -> int:
    """`keras-lora demo`: fine-tune + comparison + report (keras_lora.demo)."""
    from keras_lora import demo

    return demo.demo(args)


def find_benchmark() -> str:
    """Path of benchmarks/benchmark.py in the source checkout.

    benchmarks/ is not part of the installed package; it is found next to
    the `keras_lora` package directory (an editable install or a checkout),
    or at `$KERAS_LORA_BENCHMARK`.
    """
    candidates = [os.environ.get("KERAS_LORA_BENCHMARK")]
    candidates.append(os.path.join(_source_root(), "benchmarks", "benchmark.py"))
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "compare needs benchmarks/benchmark.py from the keras-lora source "
        f"checkout, not found at {candidates[-1]} (benchmarks/ is not "
        "installed with the package): run from a checkout with pip install "
        "-e . or set KERAS_LORA_BENCHMARK to its path"
    )


def _source_root() -> str:
    """The directory holding the `keras_lora` package (a checkout's root)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare(argv: list[str]) -> int:
    """`keras-lora compare ARGS`: runs benchmarks/benchmark.py ARGS."""
    script = find_benchmark()
    print(f"running {script}", flush=True)
    return subprocess.run([sys.executable, script, *argv]).returncode


if __name__ == "__main__":
    sys.exit(main())
