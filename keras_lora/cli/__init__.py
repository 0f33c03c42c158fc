"""The `keras-lora` command: argparse only; the work is in recipes and bench.

    keras-lora demo                          # the offline main job (quality + cost)
    keras-lora finetune --arch tiny --steps 20 --out runs/tiny
    keras-lora generate --preset runs/tiny/base_preset \\
        --adapter runs/tiny/adapter --prompt "The module"
    keras-lora merge --preset runs/tiny/base_preset \\
        --adapter runs/tiny/adapter --out runs/tiny/merged
    keras-lora export-peft --preset BASE --adapter ADAPTER --out PEFT_DIR
    keras-lora import-peft --preset BASE --peft PEFT_DIR --out ADAPTER
    keras-lora compare --tiny --steps 2      # the benchmark
    keras-lora sft --model HF_DIR --data train.jsonl --out runs/sft --inspect
    keras-lora generate --model HF_DIR --adapter runs/sft/adapter --chat "Hi"

Models: a keras-hub preset name (downloads need network), a local Keras
preset directory, a local Hugging Face GPT-2 directory (config.json +
model.safetensors, plus vocab.json + merges.txt for the tokenizer), or, for
`finetune`, a random-weight architecture (`--arch tiny|base|...`) with a
byte-level BPE tokenizer trained on the corpus (`demo` fine-tunes keras-lora's
own small pretrained GPT-2 and times the `--arch` architecture). Every output says
which weights, tokenizer and data were used.

Errors (bad arguments, missing files, unreadable adapters) print one line on
stderr and exit non-zero: 2 for bad arguments, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from keras_lora.cli import compare, saved_adapter, sft, train
from keras_lora.cli.arguments import PROG, Parser
from keras_lora.optional import MissingExtra

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `keras-lora` (all subcommands)."""
    parser = Parser(
        prog=PROG,
        description="LoRA fine-tuning of keras-hub GPT-2 models with keras-lora.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    train.add_finetune(sub)
    saved_adapter.add_commands(sub)
    train.add_demo(sub)
    compare.add_compare(sub)
    sft.add_sft(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `keras-lora`; returns the exit status.

    Args:
        argv: the arguments (without the program name); default `sys.argv`.

    Returns:
        0 on success, 1 when the command failed (one line on stderr).

    Raises:
        SystemExit: with status 2 for bad arguments (one line on stderr).

    Example:

    >>> main(["merge", "--preset", "/no/such/dir", "--adapter", "a", "--out", "o"])
    1
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return _safely(lambda a: compare.compare(a, argv), args)
    return _safely(args.run, args)


def _safely(function, args) -> int:
    """Run a command; expected failures become one line on stderr."""
    try:
        return function(args) or 0
    except MissingExtra as error:  # Its message is the whole line.
        print(error, file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:  # FileNotFoundError is an OSError.
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
