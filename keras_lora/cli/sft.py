"""`keras-lora sft`: flags -> `SftConfig` -> the sft recipe."""

from __future__ import annotations

import argparse

from keras_lora.cli.arguments import positive_int

FMT = argparse.ArgumentDefaultsHelpFormatter


def add_sft(sub) -> None:
    """Register `keras-lora sft`."""
    sft = sub.add_parser(
        "sft",
        help="instruction fine-tuning data (and, later, training) for a Hugging "
        "Face model directory.",
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
    sft.set_defaults(run=sft_command)


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
    )
    if not config.inspect:
        raise ValueError(
            "sft training is not available yet: run with --inspect to encode "
            "and check the data"
        )
    report = inspect_data(config)
    print(summary(report))
    print(f"wrote {config.out}/encoded.jsonl and {config.out}/data_report.json")
    return 0
