"""What `keras_lora.bench.engine.compare` runs: `CompareConfig`, the
choices of each of its fields, and the checks of a config against its model
and token data before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import os

from keras_lora.families import GPT2
from keras_lora.recipes.models import ARCHITECTURES, architecture

BACKENDS = ("jax", "tensorflow", "torch")
RUNS = ("full", "lora", "builtin", "floor", "peft")
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# Frozen-base options of the LoRA run (each list: the rows to run).
BASE_DTYPES = ("float32", "bfloat16")
QUANTIZE_MODES = ("none", "int8", "int4")
# keras-hub GPT-2 fails in Keras itself under RematScope "full" and
# "larger_than" (tests/test_remat.py), so only "activations" is offered.
# "blocks" checkpoints each transformer block (`keras_lora.remat_layers`).
REMAT_MODES = ("none", "activations", "blocks")
# How a quantized LoRA base is built: "after" quantizes a float model
# (`model.quantize`), "during" builds each layer quantized
# (`keras_lora.families.quantized_dtype`), so no float copy exists.
QUANTIZE_BUILDS = ("after", "during")
# The training loss of every run: "dense" computes the full logits,
# "chunked" the cross-entropy in pieces of the sequence
# (`keras_lora.chunked_causal_lm`).
LOSSES = ("dense", "chunked")
# The PEFT run's precision, one row each: "none" follows `dtype_policy`
# like the Keras runs; "bfloat16" trains under torch.autocast(bfloat16),
# the peer of a Keras bfloat16 base (weights float32, matmuls bfloat16).
PEFT_AUTOCAST = ("none", "bfloat16")
PEFT_AUTOCAST_LABELS = {"none": "", "bfloat16": "bf16 autocast"}
# Preset names whose size is known without reading them (offline).
PRESET_SIZES = {
    "gpt2_base_en": "base",
    "gpt2_medium_en": "medium",
    "gpt2_large_en": "large",
}


class ConfigError(ValueError):
    """A `CompareConfig` field with a bad value.

    The message is the field's name and `detail`; a front end that takes
    the value under another name (a command-line flag) says `detail` after
    its own.

    Args:
        field: the field's name.
        detail: what is wrong, e.g. "must be at least 1".
    """

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field} {detail}")
        self.field = field
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What `compare` runs; checked and normalised when made (a bad field
    raises `ConfigError`).

    Args:
        out: output directory.
        backends: Keras backends for the Keras runs.
        runs: which runs (`RUNS`), run in that order.
        arch: a random-weight architecture (`recipes.models.ARCHITECTURES`).
        preset: a keras-hub GPT-2 preset (name or local directory) for the
            Keras runs instead; the PEFT run uses its size, random weights.
        batch, seq: sequences per step and tokens per sequence.
        steps, warmup: timed steps, after untimed ones (compilation).
        rank, alpha: the LoRA settings.
        targets: GPT-2 projection roles to adapt (`GPT2.roles`), or
            ("all",); every run adapts the same layers, so no regexes.
        dtype_policy: Keras dtype policy (PEFT uses torch autocast to match).
        learning_rate: AdamW's learning rate.
        seed: seed for weights and random token data.
        tokens: a .npy of int ids, shape (rows, seq + 1), instead of random.
        eval_batches: hold out this many batches (the last rows) and report
            each run's loss on them.
        inference_runs: timed forward passes (each) for the LoRA run.
        rounds: repeat every run, round-robin; each reports its fastest.
        timeout: seconds allowed per run.
        base_dtypes: dtypes of the LoRA run's whole model (`BASE_DTYPES`).
        quantize: quantization modes of its frozen base (`QUANTIZE_MODES`).
        remat: `keras.RematScope` modes it is built in (`REMAT_MODES`).
            The LoRA run is repeated for every combination of these three.
        peft_autocast: the PEFT run's precisions, one row each
            (`PEFT_AUTOCAST`).
        dropout: the model's dropout rate in every run (Keras and PEFT), or
            None for GPT-2's own (0.1). 0 lets Keras's attention take
            `ops.dot_product_attention` (torch SDPA on the torch backend);
            random-weight architectures only.
        command: the command line the report names.
    """

    out: str
    backends: tuple[str, ...] = ("jax", "tensorflow")
    runs: tuple[str, ...] = RUNS
    arch: str = "base"
    preset: str | None = None
    batch: int = 8
    seq: int = 128
    steps: int = 10
    warmup: int = 3
    rank: int = 4
    alpha: float = 32.0
    targets: tuple[str, ...] = GPT2.default_targets
    dtype_policy: str = "float32"
    learning_rate: float = 5e-5
    seed: int = 0
    tokens: str | None = None
    eval_batches: int = 0
    inference_runs: int = 8
    rounds: int = 1
    timeout: float = 3600.0
    base_dtypes: tuple[str, ...] = ("float32",)
    quantize: tuple[str, ...] = ("none",)
    remat: tuple[str, ...] = ("none",)
    quantize_build: tuple[str, ...] = ("after",)
    losses: tuple[str, ...] = ("dense",)
    loss_chunks: int = 8
    peft_autocast: tuple[str, ...] = ("none",)
    dropout: float | None = None
    command: str = "keras_lora.bench.engine.compare"

    def __post_init__(self):
        backends = list(dict.fromkeys(self.backends))
        bad = [b for b in backends if b not in BACKENDS]
        if bad or not backends:
            raise ConfigError(
                "backends",
                f"{bad or backends}: unknown backend, choose from "
                f"{', '.join(BACKENDS)}",
            )
        bad = [r for r in self.runs if r not in RUNS]
        if bad or not self.runs:
            raise ConfigError(
                "runs",
                f"{bad or list(self.runs)}: unknown run, choose from {', '.join(RUNS)}",
            )
        targets = list(GPT2.roles) if tuple(self.targets) == ("all",) else self.targets
        bad = [t for t in targets if t not in GPT2.roles]
        if bad or not targets:
            raise ConfigError(
                "targets",
                f"{bad or list(targets)}: unknown target, use layer names "
                f"among {', '.join(GPT2.roles)}, or 'all' (every run must "
                "adapt the same layers, so regexes are not accepted here)",
            )
        if self.preset is None:
            architecture(self.arch)
        for name in (
            "batch",
            "seq",
            "steps",
            "rank",
            "inference_runs",
            "rounds",
            "loss_chunks",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        for name in ("warmup", "eval_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be 0 or more")
        if not self.alpha > 0:
            raise ConfigError("alpha", "must be positive")
        if self.dropout is not None:
            if not 0 <= self.dropout < 1:
                raise ConfigError("dropout", f"{self.dropout} must be in [0, 1)")
            if self.preset:
                raise ConfigError(
                    "dropout",
                    "applies to random-weight architectures: a preset keeps "
                    "the dropout of its config (leave dropout out, or use an "
                    "architecture instead of the preset)",
                )
        if self.dtype_policy not in DTYPE_POLICIES:
            raise ConfigError(
                "dtype_policy",
                f"{self.dtype_policy!r}: choose from {', '.join(DTYPE_POLICIES)}",
            )
        for name, allowed in (
            ("base_dtypes", BASE_DTYPES),
            ("quantize", QUANTIZE_MODES),
            ("remat", REMAT_MODES),
            ("quantize_build", QUANTIZE_BUILDS),
            ("losses", LOSSES),
            ("peft_autocast", PEFT_AUTOCAST),
        ):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ConfigError(
                    name,
                    f"{bad or list(values)}: choose among {', '.join(allowed)}"
                    + (
                        " (RematScope 'full' and 'larger_than' are not "
                        "supported by Keras for keras-hub GPT-2: they fail "
                        "in Keras itself)"
                        if name == "remat"
                        else ""
                    ),
                )
            object.__setattr__(self, name, tuple(v for v in allowed if v in values))
        object.__setattr__(self, "backends", tuple(backends))
        object.__setattr__(self, "runs", tuple(r for r in RUNS if r in self.runs))
        object.__setattr__(
            self, "targets", tuple(t for t in GPT2.roles if t in targets)
        )


def installed_backends() -> list[str]:
    """The Keras backends whose framework is importable here, in `BACKENDS`
    order (without importing them; each backend is named as its module)."""
    import importlib.util

    return [b for b in BACKENDS if importlib.util.find_spec(b)]


def model_config(config: CompareConfig) -> tuple[dict, str]:
    """The backbone arguments and the label every output carries."""
    if config.preset:
        arch = preset_arch(config.preset)
        label = f"GPT-2 preset {config.preset} (PEFT run: same size, RANDOM weights)"
    else:
        shape = architecture(config.arch)
        arch = shape.backbone_config()
        label = f"{shape.label}, RANDOM weights"
    if config.seq > arch["max_sequence_length"]:
        raise ValueError(
            f"--seq {config.seq} exceeds the model's max_sequence_length "
            f"{arch['max_sequence_length']}"
        )
    return arch, label


def preset_arch(preset: str) -> dict:
    """The backbone arguments of a local preset, or of a known preset name."""
    config_path = os.path.join(preset, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        config = config.get("config", config)
        keys = ARCHITECTURES["base"].backbone_config()
        arch = {k: config[k] for k in keys if k in config}
        missing = set(keys) - set(arch)
        if missing:
            raise ValueError(
                f"{config_path} lacks {', '.join(sorted(missing))}: pass a "
                "keras-hub GPT-2 preset directory"
            )
        return arch
    if preset not in PRESET_SIZES:
        raise ValueError(
            f"cannot tell the architecture of preset {preset!r}: pass a "
            "local preset directory (with config.json) or one of "
            f"{', '.join(PRESET_SIZES)}"
        )
    return architecture(PRESET_SIZES[preset]).backbone_config()


def check_tokens(config: CompareConfig, vocabulary_size: int) -> str:
    """Validate `config.tokens` against the run; returns the data label.

    Raises:
        ValueError: for an unreadable file, a wrong shape or dtype, too few
            rows or ids outside the vocabulary.
    """
    if not config.tokens:
        return f"random token ids (numpy default_rng, seed {config.seed})"
    import numpy as np

    name = f"--tokens {config.tokens!r}"
    try:
        rows = np.load(config.tokens, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{name}: cannot read a .npy ({error})") from error
    needed = (config.warmup + config.steps + config.eval_batches) * config.batch
    if rows.ndim != 2 or rows.shape[1] != config.seq + 1:
        raise ValueError(
            f"{name} has shape {rows.shape}; expected (rows, {config.seq + 1}) "
            f"for --seq {config.seq} (inputs plus the next token)"
        )
    if rows.dtype.kind not in "iu":
        raise ValueError(f"{name} holds {rows.dtype}, not int ids")
    if len(rows) < needed:
        raise ValueError(
            f"{name} has {len(rows)} rows; (warmup {config.warmup} + steps "
            f"{config.steps} + eval batches {config.eval_batches}) x batch "
            f"{config.batch} = {needed} are needed (lower --steps or --batch, "
            "or tokenize more text)"
        )
    if rows.size and (rows.min() < 0 or rows.max() >= vocabulary_size):
        raise ValueError(
            f"{name} has ids in [{rows.min()}, {rows.max()}]; the model's "
            f"vocabulary is {vocabulary_size}"
        )
    return f"token ids from {os.path.abspath(config.tokens)} ({len(rows)} rows)"
