"""`keras-lora sft`: flags -> `SftConfig` -> the sft recipe."""

from __future__ import annotations

import argparse

from keras_lora.cli.arguments import fraction, positive_float, positive_int
from keras_lora.initialization import check_init

FMT = argparse.ArgumentDefaultsHelpFormatter
# Flags whose defaults are SftConfig's: passed on only when given.
CONFIG_DEFAULTS = (
    "init",
    "use_dora",
    "steps",
    "epochs",
    "optimizer",
    "eval_every",
    "packing",
    "buckets",
)


def add_sft(sub) -> None:
    """Register `keras-lora sft`."""
    sft = sub.add_parser(
        "sft",
        help="instruction fine-tuning of a Hugging Face model directory with "
        "LoRA (--inspect: the encoded data only).",
        description="Encode instruction data as TRL's SFTTrainer does: the "
        "model's tokenizer and chat template, loss on the answers.",
        formatter_class=FMT,
    )
    sft.add_argument(
        "--model",
        required=True,
        help="local Hugging Face model directory (tokenizer.json, "
        "tokenizer_config.json, chat_template.jinja).",
    )
    sft.add_argument(
        "--data",
        required=True,
        help="JSONL, JSON list, CSV or TSV: {'text'}, {'prompt', 'completion'} "
        "(strings or chat messages) or {'messages'}.",
    )
    sft.add_argument("--out", required=True, help="output directory.")
    sft.add_argument(
        "--inspect",
        action="store_true",
        help="tokenize only: write OUT/encoded.jsonl and OUT/data_report.json.",
    )
    sft.add_argument(
        "--chat-template", help="Jinja chat template file (overrides the model's)."
    )
    sft.add_argument("--text-column", help="CSV/TSV column of the texts.")
    sft.add_argument("--prompt-column", help="CSV/TSV column of the prompts.")
    sft.add_argument("--completion-column", help="CSV/TSV column of the completions.")
    sft.add_argument(
        "--max-length",
        type=positive_int,
        default=1024,
        help="longest sequence in tokens; longer ones keep their start.",
    )
    sft.add_argument(
        "--loss-on",
        choices=("answers", "all"),
        default="answers",
        help="answers: completions and assistant turns (all of a text); "
        "all: every token.",
    )
    sft.add_argument("--eval-data", help="data file to evaluate on.")
    sft.add_argument(
        "--eval-split",
        type=fraction,
        default=0.0,
        help="without --eval-data: hold out this fraction of the examples; "
        "0 evaluates on the training data.",
    )
    sft.add_argument("--rank", type=positive_int, default=8)
    sft.add_argument("--alpha", type=positive_float, default=16.0)
    sft.add_argument("--dropout", type=fraction, default=0.0)
    sft.add_argument(
        "--init",
        type=_init,
        default=argparse.SUPPRESS,
        metavar="{kaiming,gaussian,pissa,pissa_niter_K,olora}",
        help="how the LoRA factors start (PEFT's init_lora_weights; kaiming: B = 0).",
    )
    sft.add_argument(
        "--use-dora",
        action="store_true",
        default=argparse.SUPPRESS,
        help="DoRA: also train a magnitude per output feature.",
    )
    sft.add_argument(
        "--targets",
        nargs="+",
        help="roles or layer names to adapt, or all-linear (every linear "
        "layer but the output head); default: the family's.",
    )
    length = sft.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=positive_int,
        default=argparse.SUPPRESS,
        help="optimizer steps (20 when neither --steps nor --epochs is given).",
    )
    length.add_argument(
        "--epochs",
        type=positive_int,
        default=argparse.SUPPRESS,
        help="passes over the training examples: ceil(examples / batch) steps each.",
    )
    sft.add_argument("--batch", type=positive_int, default=4)
    sft.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default=argparse.SUPPRESS,
        help="adamw (Keras's AdamW, the default) or sgd.",
    )
    sft.add_argument("--learning-rate", type=positive_float, default=2e-4)
    sft.add_argument(
        "--eval-every",
        type=positive_int,
        default=argparse.SUPPRESS,
        help="also evaluate every N steps (report.json's eval_loss_every).",
    )
    sft.add_argument(
        "--packing",
        action="store_true",
        default=argparse.SUPPRESS,
        help="several examples share each row of --max-length tokens, each "
        "attending only to itself; --batch counts rows (not for GPT-2, Gemma).",
    )
    sft.add_argument(
        "--buckets",
        choices=("on", "off"),
        default=argparse.SUPPRESS,
        type=str,
        help="on (the default): batches of a few padded lengths (8, 16, 32, "
        "... tokens); off: every batch padded to the longest example.",
    )
    sft.add_argument("--seed", type=int, default=0)
    sft.set_defaults(run=sft_command)


def _init(text: str) -> str:
    """argparse type: a LoRA initialisation name (`check_init`)."""
    try:
        return check_init(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def sft_command(args: argparse.Namespace) -> int:
    """Run `keras-lora sft` from parsed flags; returns the exit status."""
    from keras_lora.recipes.sft.config import SftConfig
    from keras_lora.recipes.sft.inspection import inspect_data, summary

    config = SftConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        chat_template=args.chat_template,
        text_column=args.text_column,
        prompt_column=args.prompt_column,
        completion_column=args.completion_column,
        max_length=args.max_length,
        loss_on=args.loss_on,
        inspect=args.inspect,
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=tuple(args.targets) if args.targets else None,
        batch=args.batch,
        learning_rate=args.learning_rate,
        seed=args.seed,
        **{name: getattr(args, name) for name in CONFIG_DEFAULTS if name in args},
    )
    if not config.inspect:
        from keras_lora.recipes.sft.run import train

        report = train(config)
        print(
            f"{report['family']}: eval loss {report['eval_loss_before']:.4f} -> "
            f"{report['eval_loss_after']:.4f} after {report['steps']} steps "
            f"({report['eval_data']})"
        )
        names = ["adapter", "peft", report["loss_plot"], "report.json"]
        print("wrote " + ", ".join(f"{config.out}/{n}" for n in names if n))
        for note in report["notes"]:
            print(note)
        return 0
    report = inspect_data(config)
    print(summary(report))
    print(f"wrote {config.out}/encoded.jsonl and {config.out}/data_report.json")
    return 0
