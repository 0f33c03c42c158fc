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
        eval_data: a data file to evaluate on (same shape rules).
        eval_split: without `eval_data`, this fraction of the examples
            (split by example, seeded) is held out; 0: evaluate on the
            training examples (the report says which).
        rank, alpha, dropout: the LoRA settings.
        targets: roles or layer names to adapt; None: the family's default.
        steps: optimizer steps.
        batch: examples per step.
        learning_rate: AdamW's learning rate.
        seed: seeds the LoRA factors, the split and the order of examples.

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
    eval_data: str | None = None
    eval_split: float = 0.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    steps: int = 20
    batch: int = 4
    learning_rate: float = 2e-4
    seed: int = 0

    def __post_init__(self):
        if self.loss_on not in LOSS_ON:
            raise ValueError(
                f"loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}"
            )
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split must be in [0, 1), got {self.eval_split}")
        for name in ("rank", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name} must be at least 1, got {getattr(self, name)}"
                )
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
