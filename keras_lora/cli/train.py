"""`keras-lora finetune` and `keras-lora demo`: flags -> configs -> recipes."""

from __future__ import annotations

import argparse

from keras_lora.cli.arguments import fraction, positive_float, positive_int
from keras_lora.families import GPT2
from keras_lora.recipes import demo as demo_lib
from keras_lora.recipes import finetune as finetune_lib
from keras_lora.recipes.models import ALIASES, ARCHITECTURES

ARCH_CHOICES = sorted([*ARCHITECTURES, *ALIASES])
FMT = argparse.ArgumentDefaultsHelpFormatter


def add_finetune(sub) -> None:
    ft = sub.add_parser(
        "finetune",
        help="LoRA fine-tune a GPT-2; save the adapter.",
        formatter_class=FMT,
    )
    model = ft.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--preset",
        help="keras-hub preset name, local Keras preset dir or local Hugging "
        "Face GPT-2 dir.",
    )
    model.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
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
    ft.add_argument("--dropout", type=fraction, default=0.0)
    ft.add_argument(
        "--targets",
        nargs="+",
        default=list(GPT2.default_targets),
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
    ft.add_argument(
        "--dtype-policy", choices=finetune_lib.DTYPE_POLICIES, default="float32"
    )
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
    ft.set_defaults(run=finetune)


def finetune(args: argparse.Namespace) -> int:
    """`keras-lora finetune`."""
    config = finetune_lib.FinetuneConfig(
        out=args.out,
        preset=args.preset,
        arch=args.arch,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        data=args.data,
        data_dir=args.data_dir,
        download=args.download,
        paragraphs=args.paragraphs,
        max_documents=args.max_documents,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=tuple(args.targets),
        batch=args.batch,
        seq=args.seq,
        steps=None if args.epochs else (args.steps or 20),
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        dtype_policy=args.dtype_policy,
        prompts=tuple(args.prompt or finetune_lib.DEFAULT_PROMPTS),
        max_length=args.max_length,
        seed=args.seed,
        save_base=not args.no_save_base,
        verbose=args.verbose,
    )
    finetune_lib.finetune(config)
    return 0


def add_demo(sub) -> None:
    dm = sub.add_parser(
        "demo",
        help="The offline main job: keras-lora's small pretrained GPT-2 "
        "fine-tuned on Python code with LoRA, fully, with keras-hub's "
        "enable_lora and with PEFT (quality), then the cost table on the "
        "GPT-2 base architecture; one report.",
        formatter_class=FMT,
    )
    defaults = demo_lib.DemoConfig()
    dm.add_argument("--out", default=defaults.out)
    dm.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default=defaults.arch,
        help="the cost table's random-weight architecture.",
    )
    for name, what in (
        ("compare-steps", "timed training steps of each cost run"),
        ("warmup", "untimed steps before them (compilation)"),
        ("eval-batches", "held-out batches for each cost run's loss"),
        ("inference-runs", "timed forward passes of the cost table's LoRA run"),
        ("batch", "rows per cost-table step"),
        ("seq", "tokens per cost-table row"),
    ):
        dm.add_argument(
            f"--{name}",
            type=positive_int,
            default=getattr(defaults, name.replace("-", "_")),
            help=what + ".",
        )
    dm.add_argument(
        "--runs",
        nargs="+",
        choices=demo_lib.COMPARE_RUNS,
        default=list(defaults.runs),
        help="runs of both parts (peft is skipped when torch, transformers or "
        "peft is missing).",
    )
    dm.add_argument(
        "--learning-rate",
        type=positive_float,
        default=defaults.learning_rate,
        help="the cost table's learning rate (the quality runs each have "
        "their own, see recipes.quality_config.QualityConfig).",
    )
    dm.add_argument("--seed", type=int, default=defaults.seed)
    dm.add_argument(
        "--no-quality",
        action="store_true",
        help="skip the quality part (the fine-tunes of keras-lora's "
        "pretrained small GPT-2 on Python code).",
    )
    for name, what in (
        ("steps", "training steps of each quality run"),
        ("batch", "rows per quality training step"),
        ("seq", "tokens per quality row (at most 128)"),
        ("eval-rows", "held-out rows per domain for the quality losses"),
        ("max-length", "length of the quality part's generations"),
    ):
        dm.add_argument(
            f"--quality-{name}",
            type=positive_int,
            default=getattr(defaults, "quality_" + name.replace("-", "_")),
            help=what + ".",
        )
    dm.set_defaults(run=demo)


def demo(args: argparse.Namespace) -> int:
    """`keras-lora demo`: exit 1 when a cost run failed."""
    from keras_lora.bench.engine import succeeded

    config = demo_lib.DemoConfig(
        out=args.out,
        arch=args.arch,
        compare_steps=args.compare_steps,
        warmup=args.warmup,
        eval_batches=args.eval_batches,
        inference_runs=args.inference_runs,
        runs=tuple(args.runs),
        batch=args.batch,
        seq=args.seq,
        learning_rate=args.learning_rate,
        seed=args.seed,
        quality=not args.no_quality,
        quality_steps=args.quality_steps,
        quality_batch=args.quality_batch,
        quality_seq=args.quality_seq,
        quality_eval_rows=args.quality_eval_rows,
        quality_max_length=args.quality_max_length,
    )
    result = demo_lib.demo(config)
    return 0 if succeeded(result["compare"]) else 1
