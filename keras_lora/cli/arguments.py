"""argparse pieces shared by the subcommands: value types and the parser."""

from __future__ import annotations

import argparse

PROG = "keras-lora"


class Parser(argparse.ArgumentParser):
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


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
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


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1) (a dropout rate, a held-out share)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def split_list(values: list[str]) -> list[str]:
    """Accept both `--runs lora floor` and `--runs lora,floor`."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def add_base(parser: argparse.ArgumentParser) -> None:
    """--preset, --tokenizer and --seq: the base model of a command."""
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
