"""`SftConfig`: everything `keras-lora sft` needs, checked when made."""

from __future__ import annotations

import dataclasses
import math
import os

from keras_lora.families import FAMILIES
from keras_lora.initialization import rewrites_kernel
from keras_lora.recipes.sft.data import Columns
from keras_lora.recipes.sft.encode import LOSS_ON
from keras_lora.recipes.sft.preset_tokenizer import is_keras_hub_preset
from keras_lora.settings import LoraSettings

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_STEPS",
    "DISTRIBUTIONS",
    "OPTIMIZERS",
    "QUANTIZE_MODES",
    "SftConfig",
    "check_family_targets",
]

OPTIMIZERS = ("adamw", "sgd")
# PEFT's shortcut for every linear layer but the output head.
ALL_LINEAR = "all-linear"
# Steps of a run given neither `steps` nor `epochs`.
DEFAULT_STEPS = 20
# The base's kernels under `--quantize` (`keras_lora.quantized`).
QUANTIZE_MODES = ("int8", "int4")
# `--distribution`: keras.distribution's DataParallel or ModelParallel.
DISTRIBUTIONS = ("data", "model")
# Steps between checkpoints (OUT/checkpoints); a run also saves one at its end.
DEFAULT_CHECKPOINT_EVERY = 100


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """The settings of one `sft` run (`--inspect` uses the data part).

    Args:
        model: a local Hugging Face model directory (tokenizer.json, and
            config.json + weights for training), or a keras-hub preset name
            or `save_to_preset` directory.
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
        targets: roles or layer names to adapt, "all-linear" (every
            linear layer but the output head) among them adding those, and
            the family's embedding name ("token_embedding") the token
            embedding (a tied output head included; see
            `check_family_targets`); None: the family's default.
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
        quantize: "int8" or "int4": the base's projections and token
            embedding quantized (LoRA over them stays float); None: float.
        remat: recompute each decoder block in the backward pass
            (`keras_lora.remat_layers`).
        chunked_loss: train with the loss computed this many pieces of the
            sequence at a time (`keras_lora.chunked_causal_lm`), so the full
            logits never exist; None: the plain loss.
        distribution: "data" or "model": `keras.distribution` over the
            devices JAX sees (JAX only; `keras_lora.recipes.sft.memory`).
        init_adapter: a keras-lora adapter directory (`save_adapter`, e.g.
            an earlier run's `OUT/adapter`) whose factors training starts
            from; its layout must be the run's (rank, targets, DoRA).
        checkpoint_every: save a checkpoint in `OUT/checkpoints` every this
            many steps (and at the end), for `resume`.
        resume: continue from the newest checkpoint in `out`, exactly;
            every setting but `steps`/`epochs`, `eval_every`,
            `checkpoint_every` and `quiet` must be the checkpoint's.
        quiet: no progress output during training.
        generate_prompts: greedy generations for this many eval prompts,
            before and after training (`report.json`'s `generations`); 0:
            none.
        generate_tokens: the most new tokens of each generation (it stops
            earlier at the end-of-turn token or EOS).
        merged_hf: also write the merged model here, as a Hugging Face
            directory with the tokenizer and chat template (transformers
            loads it as it is); None: not written.
        packing: several examples share each row of `max_length` tokens,
            each attending only to itself (`recipes.sft.packing`); `batch`
            then counts rows.
        buckets: "on": each batch is padded to the smallest of a few
            lengths (8, 16, 32, ... tokens) that holds it; "off": every batch
            is padded to the longest example (packed rows: to `max_length`).

    Raises:
        ValueError: for a setting out of range, both `steps` and `epochs`,
            or options that do not go together.

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
    quantize: str | None = None
    remat: bool = False
    chunked_loss: int | None = None
    distribution: str | None = None
    init_adapter: str | None = None
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    resume: bool = False
    quiet: bool = False
    generate_prompts: int = 3
    generate_tokens: int = 32
    merged_hf: str | None = None
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
        for name in (
            "rank",
            "steps",
            "epochs",
            "batch",
            "eval_every",
            "checkpoint_every",
        ):
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
        if self.targets is not None and not self.targets:
            raise ValueError("targets must name at least one role or layer")
        if self.init_adapter is not None and rewrites_kernel(self.init):
            raise ValueError(
                f"init {self.init!r} rewrites the base kernels; an init_adapter "
                "starts from saved factors on the original kernels: give one"
            )
        if self.resume and self.inspect:
            raise ValueError("resume continues training; inspect does not train")
        if self.generate_prompts < 0:
            raise ValueError(
                f"generate_prompts must be 0 or more, got {self.generate_prompts}"
            )
        if self.generate_tokens < 1:
            raise ValueError(
                f"generate_tokens must be at least 1, got {self.generate_tokens}"
            )
        if self.merged_hf is not None:
            _check_merged_hf(self.merged_hf, self.out, self.model)
        # LoraSettings raises for a bad alpha, dropout or init.
        _ = self.lora
        self._check_memory_options()
        if is_keras_hub_preset(self.model):
            for name, given in (
                ("merged_hf", self.merged_hf is not None),
                ("distribution='model'", self.distribution == "model"),
            ):
                if given:
                    raise ValueError(
                        f"{name} reads the Hugging Face files of the model "
                        f"(config.json, the tokenizer); {self.model} is a "
                        "keras-hub preset: give a Hugging Face directory"
                    )
        if self.text_column is not None and (
            self.prompt_column is not None or self.completion_column is not None
        ):
            raise ValueError(
                "give either a text column or prompt and completion columns, not both"
            )

    def _check_memory_options(self) -> None:
        """`quantize`, `chunked_loss` and `distribution` (`__post_init__`)."""
        if self.quantize is not None:
            if self.quantize not in QUANTIZE_MODES:
                raise ValueError(
                    f"quantize must be one of {', '.join(QUANTIZE_MODES)}, "
                    f"got {self.quantize!r}"
                )
            if self.use_dora:
                raise ValueError(
                    "DoRA rescales each column of the full kernel, which a "
                    f"{self.quantize} base does not hold: drop --use-dora or "
                    "--quantize"
                )
            if self.init not in ("kaiming", "gaussian"):
                raise ValueError(
                    f"init={self.init!r} moves part of each kernel into the "
                    f"factors, which a {self.quantize} kernel cannot give: use "
                    "--init kaiming or gaussian with --quantize"
                )
        if self.chunked_loss is not None and self.chunked_loss < 1:
            raise ValueError(
                f"chunked_loss must be at least 1, got {self.chunked_loss}"
            )
        if self.packing:
            for name, given in (
                ("chunked_loss", self.chunked_loss is not None),
                ("distribution", self.distribution is not None),
            ):
                if given:
                    raise ValueError(
                        f"packing does not combine with {name}: the packed "
                        "model runs the decoder blocks itself, and that pair "
                        f"is not built; drop --packing or --{name.replace('_', '-')}"
                    )
        if self.distribution is None:
            return
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                f"got {self.distribution!r}"
            )
        import keras

        if keras.backend.backend() != "jax":
            raise ValueError(
                "--distribution runs keras.distribution, which needs the JAX "
                f"backend; this is {keras.backend.backend()!r}: run with "
                "KERAS_BACKEND=jax"
            )
        if self.quantize is not None:
            raise ValueError(
                "--distribution lays out float weights only: drop --quantize "
                "or --distribution"
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


def check_family_targets(config: SftConfig, family) -> tuple[str, ...]:
    """The targets of `config` on a model of `family`, or why they fail.

    `targets` may name the family's token embedding (`Family.embedding`)
    beside roles, layer names or "all-linear". Its LoRA exports to PEFT
    only where the family maps PEFT's embedding module
    (`Family.hf_embedding`), and it takes no DoRA, no PiSSA/OLoRA init and
    no quantized table: those are refused here, before training.

    Args:
        config: the run's settings.
        family: the model's `keras_lora.families.Family`.

    Returns:
        `config.targets`, or the family's default targets.

    Raises:
        ValueError: naming the setting and the fix.

    Example:

    >>> from keras_lora.families import GPT2, QWEN2
    >>> targets = ("all-linear", "token_embedding")
    >>> config = SftConfig("m", "d.jsonl", "o", targets=targets)
    >>> check_family_targets(config, GPT2)
    ('all-linear', 'token_embedding')
    >>> check_family_targets(config, QWEN2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --targets token_embedding: OUT/peft cannot hold it: ... Qwen2; ...
    """
    targets = tuple(config.targets or family.default_targets)
    if family.embedding not in targets:
        return targets
    name = family.embedding
    if not family.hf_embedding:
        mapped = [f.label for f in FAMILIES if f.hf_embedding]
        raise ValueError(
            f"--targets {name}: OUT/peft cannot hold it: keras-lora maps "
            f"PEFT's embedding module for {', '.join(mapped)}, not for "
            f"{family.label}; drop {name} from --targets"
        )
    for flag, refused in (
        ("--use-dora", config.use_dora),
        (f"--init {config.init}", config.lora.rewrites_kernel),
        (f"--quantize {config.quantize}", config.quantize is not None),
    ):
        if refused:
            raise ValueError(
                f"--targets {name} does not combine with {flag}: the "
                f"embedding's LoRA takes a float table, no DoRA and a "
                f"kaiming or gaussian init; drop {flag} or {name}"
            )
    return targets


def _check_merged_hf(merged: str, out: str, model: str) -> None:
    """`merged` replaces a whole directory: never OUT, the base model, a
    folder above either, or OUT's adapter directories."""
    merged = os.path.abspath(merged)
    out, model = os.path.abspath(out), os.path.abspath(model)
    taken = {out, model, os.path.join(out, "adapter"), os.path.join(out, "peft")}
    if merged in taken or any(p.startswith(merged + os.sep) for p in (out, model)):
        raise ValueError(
            f"merged_hf {merged} would replace the output directory, the base "
            "model or their adapters: give the merged model a directory of its own"
        )
