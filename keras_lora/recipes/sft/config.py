"""`SftConfig`: everything `keras-lora sft` needs, checked when made."""

from __future__ import annotations

import dataclasses

from keras_lora.recipes.sft.data import Columns
from keras_lora.recipes.sft.encode import LOSS_ON

__all__ = ["SftConfig"]


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """The settings of one `sft` run (`--inspect` uses the data part).

    Args:
        model: a local Hugging Face model directory (tokenizer.json, and
            config.json + weights for training).
        data: the training data file (`data.read_examples`).
        out: the output directory.
        chat_template: a Jinja template file overriding the model's.
        text_column: CSV/TSV column of a language-modelling file.
        prompt_column: CSV/TSV column of the prompts.
        completion_column: CSV/TSV column of the completions.
        max_length: longest sequence in tokens; longer ones keep their start
            (TRL's default 1024).
        loss_on: "answers" (completions, assistant turns, all of a text) or
            "all" (every token).
        inspect: tokenize only: write `encoded.jsonl` and `data_report.json`.

    Raises:
        ValueError: for a setting out of range.

    Example:

    >>> SftConfig(model="m", data="d.jsonl", out="o", max_length=512).loss_on
    'answers'
    >>> SftConfig(model="m", data="d.jsonl", out="o", loss_on="prompt")
    Traceback (most recent call last):
    ...
    ValueError: loss_on must be one of answers, all, got 'prompt'
    """

    model: str
    data: str
    out: str
    chat_template: str | None = None
    text_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    max_length: int = 1024
    loss_on: str = "answers"
    inspect: bool = False

    def __post_init__(self):
        if self.loss_on not in LOSS_ON:
            raise ValueError(
                f"loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}"
            )
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        if self.text_column is not None and (
            self.prompt_column is not None or self.completion_column is not None
        ):
            raise ValueError(
                "give either a text column or prompt and completion columns, not both"
            )

    @property
    def columns(self) -> Columns:
        """The CSV/TSV column names."""
        return Columns(self.text_column, self.prompt_column, self.completion_column)
