"""`SftConfig`: everything `keras-lora sft` needs, checked when made."""

from __future__ import annotations

import dataclasses
import math

from keras_lora.recipes.sft.data import Columns
from keras_lora.recipes.sft.encode import LOSS_ON
from keras_lora.settings import LoraSettings

__all__ = ["ALL_LINEAR", "DEFAULT_STEPS", "OPTIMIZERS", "SftConfig"]

OPTIMIZERS = ("adamw", "sgd")
# PEFT's shortcut for every linear layer but the output head.
ALL_LINEAR = "all-linear"
# Steps of a run given neither `steps` nor `epochs`.
DEFAULT_STEPS = 20


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
        init: how the LoRA factors start: "kaiming", "gaussian", "pissa",
            "pissa_niter_K" or "olora" (`keras_lora.initialization`).
        use_dora: DoRA: also train a magnitude per output feature
            (`keras_lora.dora`).
        targets: roles or layer names to adapt, or `("all-linear",)` (every
            linear layer but the output head); None: the family's default.
        steps: optimizer steps; None: `epochs` passes, or 20 steps when
            neither is given.
        epochs: passes over the training examples, as
            `ceil(examples / batch) * epochs` steps (each pass a fresh
            seeded order); exclusive with `steps`.
        batch: examples per step.
        optimizer: "adamw" (Keras's AdamW defaults) or "sgd" (plain SGD).
        learning_rate: the optimizer's learning rate.
        eval_every: also evaluate after every this many steps; None: before
            and after training only.
        seed: seeds the LoRA factors, the split and the order of examples.
        packing: several examples share each row of `max_length` tokens,
            each attending only to itself (`recipes.sft.packing`); `batch`
            then counts rows.
        buckets: "on": each batch is padded to the smallest of a few
            lengths (8, 16, 32, ... tokens) that holds it; "off": every batch
            is padded to the longest example (packed rows: to `max_length`).

    Raises:
        ValueError: for a setting out of range, or both `steps` and `epochs`.

    Example:

    >>> SftConfig(model="m", data="d.jsonl", out="o", max_length=512).loss_on
    'answers'
    >>> SftConfig(model="m", data="d.jsonl", out="o", loss_on="prompt")
    Traceback (most recent call last):
    ...
    ValueError: loss_on must be one of answers, all, got 'prompt'
    >>> SftConfig(model="m", data="d.jsonl", out="o", epochs=2).total_steps(9)
    6
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
    init: str = LoraSettings.init
    use_dora: bool = LoraSettings.use_dora
    targets: tuple[str, ...] | None = None
    steps: int | None = None
    epochs: int | None = None
    batch: int = 4
    optimizer: str = "adamw"
    learning_rate: float = 2e-4
    eval_every: int | None = None
    seed: int = 0
    packing: bool = False
    buckets: str = "on"

    def __post_init__(self):
        if self.loss_on not in LOSS_ON:
            raise ValueError(
                f"loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}"
            )
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split must be in [0, 1), got {self.eval_split}")
        for name in ("rank", "steps", "epochs", "batch", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(
                "give either steps or epochs, not both (epochs trains "
                "ceil(examples / batch) steps per pass)"
            )
        if self.buckets not in ("on", "off"):
            raise ValueError(f"buckets must be on or off, got {self.buckets!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                f"got {self.optimizer!r}"
            )
        if self.targets is not None and ALL_LINEAR in self.targets:
            if len(self.targets) > 1:
                raise ValueError(
                    f"{ALL_LINEAR} stands alone: give it or layer names, "
                    f"got {' '.join(self.targets)}"
                )
        # LoraSettings raises for a bad alpha, dropout or init.
        _ = self.lora
        if self.text_column is not None and (
            self.prompt_column is not None or self.completion_column is not None
        ):
            raise ValueError(
                "give either a text column or prompt and completion columns, not both"
            )

    @property
    def lora(self) -> LoraSettings:
        """The adapter's settings, as `inject_lora` takes them."""
        return LoraSettings(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            seed=self.seed,
            init=self.init,
            use_dora=self.use_dora,
        )

    def total_steps(self, examples: int) -> int:
        """The optimizer steps of the run, for `examples` training examples."""
        if self.epochs is not None:
            return math.ceil(examples / self.batch) * self.epochs
        return DEFAULT_STEPS if self.steps is None else self.steps

    @property
    def columns(self) -> Columns:
        """The CSV/TSV column names."""
        return Columns(self.text_column, self.prompt_column, self.completion_column)
