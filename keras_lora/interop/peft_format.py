"""The Hugging Face PEFT LoRA adapter format, independent of any model.

A PEFT adapter directory holds `adapter_config.json` (a `LoraConfig`) and
`adapter_model.safetensors`, whose keys end in `lora_A.weight`, shaped
(rank, fan_in), and `lora_B.weight`, shaped (fan_out, rank). Each module's
update is scaled by `lora_alpha / r` (or `lora_alpha / sqrt(r)` with
`use_rslora`); `rank_pattern` and `alpha_pattern` carry per-module values.
With `use_dora`, each module also has `lora_magnitude_vector`, shaped
(fan_out,): DoRA's magnitude per output feature. An embedding's keys end in
`lora_embedding_A` (rank, vocabulary) and `lora_embedding_B` (dim, rank),
without ".weight", as `get_peft_model_state_dict` writes them.

This module reads and writes those files and refuses every config option
that changes what the adapter computes beyond plain LoRA factors. Which
module names exist, and which Keras layers they are, is the exchange
engine's business (`keras_lora.interop.peft_modules`). Only safetensors and JSON
are read or written: never pickle.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re

import numpy as np
import safetensors
import safetensors.numpy

from keras_lora.files import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Config fields that do not change what the adapter computes (or whose
# value is checked on its own below). Any other field must be unset.
_NEUTRAL_FIELDS = frozenset(
    {
        "peft_type",
        "peft_version",
        "task_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_dora",
        "init_lora_weights",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "megatron_core",
        "qalora_group_size",
        "ensure_weight_tying",
        # Initialisation recipes: they shape A and B before training only.
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
    }
)
# `init_lora_weights` values that leave the base weights untouched. PiSSA,
# OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base weights (the adapter only
# fits that residual model), and MiCA is a different forward pass.
_PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal"})
# PEFT's LoraConfig defaults, for configs that leave them out.
_DEFAULT_RANK = 8
_DEFAULT_ALPHA = 8


@dataclasses.dataclass
class PeftModule:
    """One PEFT module's factors and scaling, in PEFT's layout."""

    rank: int
    alpha: float
    lora_a: np.ndarray  # (rank, fan_in)
    lora_b: np.ndarray  # (fan_out, rank); a fused module's roles stack here.
    magnitude: np.ndarray | None = None  # (fan_out,), with DoRA only.
    # An embedding: keys `lora_embedding_A` / `lora_embedding_B` (PEFT's
    # `lora.Embedding`), fan_in = vocabulary, fan_out = dim.
    embedding: bool = False

    @property
    def use_dora(self) -> bool:
        """Whether the module carries DoRA's magnitude."""
        return self.magnitude is not None


# --- reading ----------------------------------------------------------------


def read_config(path: str) -> dict:
    """The JSON object in `path/adapter_config.json`."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"No PEFT adapter at '{path}': '{CONFIG_NAME}' is missing. Pass "
            "the directory written by PEFT's `save_pretrained` or "
            "`export_peft`."
        )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read '{config_path}': {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"'{config_path}' does not hold a JSON object.")
    return config


def check_config(config: dict, base_model: str = "the base model") -> None:
    """Raise `ValueError` for any option that changes what LoRA computes.

    `base_model` names the model the factors must fit, for the messages.
    """
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"The adapter is of type {peft_type!r}; only PEFT LoRA adapters "
            "(peft_type 'LORA') can be imported."
        )
    if not isinstance(config.get("use_dora", False), bool):
        raise ValueError(
            f"Invalid `use_dora={config['use_dora']!r}` in the adapter config; "
            "it must be true or false."
        )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"The adapter trains biases (`bias={config['bias']!r}`); only "
            "adapters with bias='none' map onto LoraLayers exactly."
        )
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and str(init).lower() not in _PLAIN_INITS:
        raise ValueError(
            f"The adapter was initialised with `init_lora_weights={init!r}`, "
            "which rewrites the base weights (or changes the forward pass), "
            f"so its factors do not fit {base_model}. Convert it to a "
            "plain LoRA adapter in PEFT first (`save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)`)."
        )
    for field, value in config.items():
        if field not in _NEUTRAL_FIELDS and value not in (None, False, [], {}, ""):
            raise ValueError(
                f"The adapter sets `{field}={value!r}`: a PEFT option that "
                "changes the model beyond plain LoRA factors (or one unknown "
                "to keras_lora), so it cannot be imported exactly."
            )
    dropout = config.get("lora_dropout") or 0.0
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"Invalid `lora_dropout={dropout!r}` in the adapter config.")


def base_model_class(config: dict) -> str | None:
    """The transformers class PEFT recorded the adapter for, if any."""
    auto_mapping = config.get("auto_mapping")
    if isinstance(auto_mapping, dict) and auto_mapping.get("base_model_class"):
        return str(auto_mapping["base_model_class"])
    return None


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor in `path/adapter_model.safetensors` (never a .bin)."""
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise ValueError(
            f"No '{WEIGHTS_NAME}' in '{path}'."
            + (
                " Only a pickled 'adapter_model.bin' is there, which is not "
                "loaded (pickle can run code); save the adapter with "
                "`save_pretrained(..., safe_serialization=True)`."
                if pickled
                else ""
            )
        )
    try:
        return safetensors.numpy.load_file(weights_path)
    except TypeError:
        # NumPy has no bfloat16; read those tensors by hand.
        return _load_with_bfloat16(weights_path)
    except Exception as e:  # safetensors raises its own error types.
        raise ValueError(f"Cannot read '{weights_path}': {e}") from None


def _load_with_bfloat16(weights_path: str) -> dict[str, np.ndarray]:
    """`safetensors.numpy.load_file` for a NumPy without bfloat16.

    (With ml_dtypes loaded, as JAX and TensorFlow do, NumPy has it.)
    """
    with open(weights_path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        data = f.read()
    tensors = {}
    with safetensors.safe_open(weights_path, framework="np") as f:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] == "BF16":
                # bfloat16 is the top half of a float32.
                start, end = info["data_offsets"]
                bits = np.frombuffer(data[start:end], "<u2").astype("<u4") << 16
                tensors[name] = bits.view("<f4").reshape(info["shape"])
            else:
                tensors[name] = f.get_tensor(name)
    return tensors


def peft_module(
    config: dict, name: str, factors: dict[str, np.ndarray], fan_in: int, fan_out: int
) -> PeftModule:
    """Check one module's factors against its config and the model.

    Args:
        config: the adapter config.
        name: the module's full name, as PEFT matches patterns against
            it (model prefix, block, module: no "base_model.model.").
        factors: `{"A": lora_A, "B": lora_B}` as read, and `"M"`:
            `lora_magnitude_vector` with DoRA (`use_dora` in `config`).
        fan_in: the input features of the model's module.
        fan_out: its output features (of all roles, for a fused module).

    Returns:
        The module, with float32 factors.
    """
    use_dora = bool(config.get("use_dora", False))
    for key, label in (("A", "lora_A"), ("B", "lora_B")):
        if key not in factors:
            raise ValueError(f"Module '{name}' has no {label} weight.")
    if use_dora != ("M" in factors):
        raise ValueError(
            f"Module '{name}' "
            + (
                "has no lora_magnitude_vector, but the config sets "
                "`use_dora=True`: the DoRA adapter is incomplete."
                if use_dora
                else "has a lora_magnitude_vector (DoRA), but the config "
                "does not set `use_dora=True`: the adapter is inconsistent."
            )
        )
    magnitude = factors.get("M")
    if magnitude is not None and magnitude.shape != (fan_out,):
        raise ValueError(
            f"Shape mismatch for '{name}': lora_magnitude_vector "
            f"{magnitude.shape}, but this model's module needs {(fan_out,)}."
        )
    rank, alpha = module_rank_alpha(config, name)
    lora_a, lora_b = factors["A"], factors["B"]
    if lora_a.shape != (rank, fan_in) or lora_b.shape != (fan_out, rank):
        raise ValueError(
            f"Shape mismatch for '{name}': lora_A {lora_a.shape} and "
            f"lora_B {lora_b.shape}, but rank {rank} on this model needs "
            f"lora_A {(rank, fan_in)} and lora_B {(fan_out, rank)}."
        )
    for factor in (lora_a, lora_b) + ((magnitude,) if use_dora else ()):
        # bfloat16 (from ml_dtypes) is not a NumPy floating subtype.
        if not (
            np.issubdtype(factor.dtype, np.floating) or factor.dtype.name == "bfloat16"
        ):
            raise ValueError(
                f"'{name}' has {factor.dtype} factors; LoRA factors must "
                "be floating point."
            )
    return PeftModule(
        rank=rank,
        alpha=alpha,
        lora_a=lora_a.astype("float32"),
        lora_b=lora_b.astype("float32"),
        magnitude=None if magnitude is None else magnitude.astype("float32"),
    )


def module_rank_alpha(config: dict, name: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives a module, by its full name."""
    rank = _pattern_value(
        config.get("rank_pattern"), name, config.get("r", _DEFAULT_RANK)
    )
    alpha = _pattern_value(
        config.get("alpha_pattern"), name, config.get("lora_alpha", _DEFAULT_ALPHA)
    )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"Invalid rank {rank!r} for '{name}' in the adapter config.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(
            f"Invalid lora_alpha {alpha!r} for '{name}' in the adapter config; "
            "keras_lora needs a positive alpha."
        )
    return rank, alpha


def _pattern_value(pattern, name: str, default):
    """PEFT's `get_pattern_key`: the first key matching the end of `name`."""
    if not pattern:
        return default
    if not isinstance(pattern, dict):
        raise ValueError(f"Invalid rank/alpha pattern {pattern!r}: not a mapping.")
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise ValueError(
                f"Invalid pattern {key!r} in the adapter config: {e}"
            ) from None
    return default


# --- writing ----------------------------------------------------------------


def lora_config(
    modules: dict[str, PeftModule],
    *,
    target_modules: list[str],
    use_rslora: bool,
    dropout: float,
    fan_in_fan_out: bool,
    task_type: str | None,
    base_model_name_or_path: str | None,
    use_dora: bool = False,
    ensure_weight_tying: bool = False,
) -> dict:
    """A LoraConfig dict: the most common rank and alpha, patterns for the rest.

    Args:
        modules: module name below the model's prefix (block and module)
            -> its factors; every name becomes one escaped pattern key.
        target_modules: the config's `target_modules`.
        use_rslora: PEFT's one `use_rslora` flag.
        dropout: the one `lora_dropout`.
        fan_in_fan_out: whether the base weights are stored (in, out).
        task_type: PEFT's task type, or None (a base model).
        base_model_name_or_path: recorded for reference.
        use_dora: whether the modules carry DoRA magnitudes.
        ensure_weight_tying: PEFT's flag that ties an output head's
            adapter to the embedding's (set when both are exported).
    """
    counts = collections.Counter
    rank = counts(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = counts(m.alpha for m in modules.values()).most_common(1)[0][0]
    # Pattern keys are regexes PEFT matches at the end of a module's full
    # name; escaped, each names one module.
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {
            re.escape(n): m.rank for n, m in modules.items() if m.rank != rank
        },
        "alpha_pattern": {
            re.escape(n): m.alpha for n, m in modules.items() if m.alpha != alpha
        },
        "use_rslora": use_rslora,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_dora": use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        **({"ensure_weight_tying": True} if ensure_weight_tying else {}),
    }


def tidy(value: float) -> int | float:
    """`value` as an int when it is one (up to rounding), for a tidy config."""
    rounded = round(value)
    if math.isclose(value, rounded, rel_tol=1e-12, abs_tol=1e-12):
        return int(rounded)
    return float(value)


def write_adapter(path: str, config: dict, modules: dict[str, PeftModule]) -> str:
    """Write an adapter directory; `modules` maps each module's key prefix
    (everything before ".lora_A.weight") to its factors.

    Each file is replaced atomically, weights first: an interrupted export
    never leaves a half-written file for PEFT to load.
    """
    tensors = {}
    for key, module in modules.items():
        if module.embedding:
            tensors[f"{key}.lora_embedding_A"] = np.ascontiguousarray(module.lora_a)
            tensors[f"{key}.lora_embedding_B"] = np.ascontiguousarray(module.lora_b)
            continue
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(module.lora_a)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(module.lora_b)
        if module.use_dora:
            # PEFT's key: `get_peft_model_state_dict` drops ".weight" here.
            tensors[f"{key}.lora_magnitude_vector"] = np.ascontiguousarray(
                module.magnitude
            )
    os.makedirs(path, exist_ok=True)
    atomic_write(
        os.path.join(path, WEIGHTS_NAME),
        safetensors.numpy.save(tensors, metadata={"format": "pt"}),
    )
    atomic_write(
        os.path.join(path, CONFIG_NAME),
        json.dumps(config, indent=2, sort_keys=True).encode("utf-8"),
    )
    return path
