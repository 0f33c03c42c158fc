"""Exchange LoRA adapters with Hugging Face PEFT for keras-hub GPT-2.

A PEFT adapter directory holds `adapter_config.json` and
`adapter_model.safetensors`. For transformers' `GPT2LMHeadModel` its keys are
`base_model.model.transformer.h.{i}.{module}.lora_A.weight` (rank, in) and
`...lora_B.weight` (out, rank), for the modules

    attn.c_attn   fused query|key|value    keras-hub query, key, value
    attn.c_proj   attention output         keras-hub attention_output
    mlp.c_fc      feed-forward in          feedforward_intermediate_dense
    mlp.c_proj    feed-forward out         feedforward_output_dense

transformers' `c_attn` is one projection whose 3 * hidden outputs are the
query, key and value columns, each ordered (heads, head_dim) exactly as
keras-hub's `(hidden, heads, head_dim)` kernels flatten. Separate query, key
and value factors are therefore one fused adapter of rank
`rank_q + rank_k + rank_v`: A stacks the three A's, B is block-diagonal (zero
rows for a projection without LoRA). Going back, every row block of a fused B
takes the whole (shared) A. Both directions are exact: the same function,
not an approximation.

The update is scaled by `lora_alpha / r` (or `lora_alpha / sqrt(r)` with
`use_rslora`) per PEFT module; `rank_pattern` and `alpha_pattern` carry
per-module values. Only safetensors and JSON are read or written: never
pickle.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re

import keras
import numpy as np
import safetensors
import safetensors.numpy

from keras_lora.files import atomic_write
from keras_lora.injection import lora_layers, wrap_layers
from keras_lora.kernel_split import split_kernel
from keras_lora.layer import LoraLayer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# The PEFT modules of one GPT-2 block, and the keras-hub layers (roles)
# behind each, in the order their outputs are concatenated in transformers.
_MODULE_ROLES = {
    "attn.c_attn": ("query", "key", "value"),
    "attn.c_proj": ("attention_output",),
    "mlp.c_fc": ("feedforward_intermediate_dense",),
    "mlp.c_proj": ("feedforward_output_dense",),
}
_KEY_PATTERN = re.compile(
    r"base_model\.model\.(?P<prefix>(?:transformer\.)?)h\.(?P<block>\d+)\."
    r"(?P<module>attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
    r"\.lora_(?P<factor>[AB])\.weight"
)
# transformers classes whose module names the keys refer to.
_HF_PREFIXES = {"GPT2LMHeadModel": "transformer.", "GPT2Model": ""}

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


@dataclasses.dataclass
class _Module:
    """One PEFT module: its fused factors and scaling."""

    rank: int
    alpha: float
    lora_a: np.ndarray  # (rank, fan_in), PEFT layout.
    lora_b: np.ndarray  # (fan_out of all roles, rank), PEFT layout.


def export_peft(
    model: keras.layers.Layer,
    path: str | os.PathLike,
    *,
    hf_model: str = "GPT2LMHeadModel",
    base_model_name_or_path: str | None = None,
) -> str:
    """Write the LoRA factors of a keras-hub GPT-2 as a PEFT adapter.

    The directory loads with `peft.PeftModel.from_pretrained(base, path)`
    on a transformers GPT-2 holding the same base weights, and computes the
    same logits. Query, key and value factors of a block fuse into one
    `attn.c_attn` adapter whose rank is the sum of their ranks; its
    `lora_alpha` is chosen so that PEFT's scaling equals the Keras layers'
    `scale`. Modules whose rank or alpha differ from the most common ones go
    into `rank_pattern` / `alpha_pattern`.

    Args:
        model: a `keras_hub.models.GPT2CausalLM` or `GPT2Backbone` with
            `LoraLayer`s (from `inject_lora`) on any of query, key, value,
            attention_output, feedforward_intermediate_dense and
            feedforward_output_dense.
        path: directory to write (created if needed; files are replaced).
        hf_model: the transformers class the adapter is for,
            `"GPT2LMHeadModel"` (keys under `transformer.`) or
            `"GPT2Model"`.
        base_model_name_or_path: recorded in the config for reference.

    Returns:
        The directory path, as a string.

    Raises:
        ValueError: if the model is not a keras-hub GPT-2, has no
            `LoraLayer`, has one on a layer PEFT's GPT-2 has no module for,
            or its factors need what one PEFT config cannot say: query, key
            and value of one block with different scales, or different
            dropout rates.

    Example:

    >>> lm = keras_hub.models.GPT2CausalLM.from_preset(hf_dir, preprocessor=None)
    >>> lm = inject_lora(lm, rank=4, alpha=8.0, targets=("query", "value"))
    >>> # ... lm.fit(...)
    >>> export_peft(lm, "adapter")  # c_attn adapter, r=8, lora_alpha=16
    'adapter'
    """
    if hf_model not in _HF_PREFIXES:
        raise ValueError(
            f"`hf_model` must be one of {sorted(_HF_PREFIXES)}. "
            f"Received: hf_model={hf_model!r}"
        )
    backbone = _gpt2_backbone(model)
    wrapped = lora_layers(model)
    if not wrapped:
        raise ValueError(
            f"Model '{model.name}' has no LoraLayer to export. Call "
            "`inject_lora(model)` first."
        )
    slots = _slots(backbone)
    use_rslora = all(layer.use_rslora for layer in wrapped)
    modules = {
        (block, module): _fused_module(block, module, layers, slots, use_rslora)
        for (block, module), layers in _group_by_module(slots, wrapped).items()
    }
    config = _peft_config(
        modules,
        use_rslora=use_rslora,
        dropout=_common_dropout(wrapped),
        num_blocks=len(backbone.transformer_layers),
        hf_model=hf_model,
        base_model_name_or_path=base_model_name_or_path,
    )
    prefix = "base_model.model." + _HF_PREFIXES[hf_model]
    tensors = {}
    for (block, module), fused in modules.items():
        key = f"{prefix}h.{block}.{module}"
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(fused.lora_a)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(fused.lora_b)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    # Each file is replaced atomically, weights first: an interrupted export
    # never leaves a half-written file for PEFT to load.
    atomic_write(
        os.path.join(path, WEIGHTS_NAME),
        safetensors.numpy.save(tensors, metadata={"format": "pt"}),
    )
    atomic_write(
        os.path.join(path, CONFIG_NAME),
        json.dumps(config, indent=2, sort_keys=True).encode("utf-8"),
    )
    return path


def import_peft(
    model: keras.layers.Layer,
    path: str | os.PathLike,
    *,
    seed: int | None = None,
) -> keras.layers.Layer:
    """Load a Hugging Face PEFT LoRA adapter for GPT-2 into a keras-hub GPT-2.

    Each adapted module becomes `LoraLayer`s (all other weights are frozen,
    as by `inject_lora`) holding exactly the adapter's factors and
    scale: a fused `attn.c_attn` adapter of rank r becomes query, key and
    value layers of rank r that share its A and take their rows of its B.
    `rank_pattern`, `alpha_pattern`, `use_rslora` and `lora_dropout` carry
    over. The model must hold the base weights the adapter was trained on
    (see `GPT2CausalLM.from_preset(hf_dir)` for a Hugging Face checkpoint).

    Everything is checked before the model changes: on error it is left as
    it was.

    Args:
        model: a `keras_hub.models.GPT2CausalLM` or `GPT2Backbone` without
            `LoraLayer`s.
        path: a PEFT adapter directory (`adapter_config.json` and
            `adapter_model.safetensors`), as written by PEFT's
            `save_pretrained` or `export_peft`.
        seed: seed for the LoRA dropout.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: if a file is missing (or only a pickled
            `adapter_model.bin` exists), the model is not a keras-hub GPT-2
            or already has `LoraLayer`s, or the adapter cannot be mapped
            exactly: not LoRA, DoRA, `bias` other than "none", base-weight
            rewriting initialisations (PiSSA, OLoRA, LoftQ, ...), other
            options that change the forward pass, keys for other modules or
            architectures, missing factors, shapes that do not fit the model.

    Example:

    >>> lm = keras_hub.models.GPT2CausalLM.from_preset(hf_dir, preprocessor=None)
    >>> lm = import_peft(lm, "peft_adapter_dir")
    >>> [layer.name for layer in lora_layers(lm)][:3]
    ['query', 'key', 'value']
    """
    backbone = _gpt2_backbone(model)
    if lora_layers(model):
        raise ValueError(
            f"Model '{model.name}' already has LoraLayers. Import a PEFT "
            "adapter into a model without LoRA (merge or rebuild it first)."
        )
    path = os.fspath(path)
    config = _read_config(path)
    _check_config(config)
    modules = _read_modules(config, _read_tensors(path), backbone)
    slots = _slots(backbone)
    common = dict(
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        seed=seed,
    )
    # One call wraps every layer, each with its module's rank and alpha,
    # and freezes the rest, as `inject_lora` does.
    wrap_layers(
        model,
        {
            id(slots[block, role]): dict(common, rank=fused.rank, alpha=fused.alpha)
            for (block, module), fused in modules.items()
            for role in _MODULE_ROLES[module]
        },
    )
    slots = _slots(backbone)  # The attributes now hold the LoraLayers.
    for (block, module), fused in modules.items():
        row = 0
        for role in _MODULE_ROLES[module]:
            layer = slots[block, role]
            rows = slice(row, row + layer.split.fan_out)
            row = rows.stop
            layer.lora_a.assign(
                fused.lora_a.T.reshape(layer.split.in_shape + (fused.rank,))
            )
            layer.lora_b.assign(
                fused.lora_b[rows].T.reshape((fused.rank,) + layer.split.out_shape)
            )
    return model


def _gpt2_backbone(model):
    # Imported here: the rest of keras_lora works without keras-hub loaded.
    import keras_hub

    if isinstance(model, keras_hub.models.GPT2CausalLM):
        return model.backbone
    if isinstance(model, keras_hub.models.GPT2Backbone):
        return model
    raise ValueError(
        "PEFT exchange supports keras-hub GPT-2 only: pass a "
        "`keras_hub.models.GPT2CausalLM` or `GPT2Backbone`. "
        f"Received: {type(model).__name__}"
    )


def _slots(backbone) -> dict[tuple[int, str], keras.layers.Layer]:
    """`(block, role) -> layer` for every projection PEFT can adapt."""
    slots = {}
    for block, decoder in enumerate(backbone.transformer_layers):
        attention = decoder._self_attention_layer
        slots[block, "query"] = attention._query_dense
        slots[block, "key"] = attention._key_dense
        slots[block, "value"] = attention._value_dense
        slots[block, "attention_output"] = attention._output_dense
        slots[block, "feedforward_intermediate_dense"] = (
            decoder._feedforward_intermediate_dense
        )
        slots[block, "feedforward_output_dense"] = decoder._feedforward_output_dense
    return slots


def _group_by_module(slots, wrapped):
    """Group the LoraLayers by PEFT module: `(block, module) -> {role: layer}`."""
    where = {id(layer): key for key, layer in slots.items()}
    modules = {}
    for layer in wrapped:
        if id(layer) not in where:
            raise ValueError(
                f"LoraLayer '{layer.name}' wraps a layer that transformers' "
                "GPT-2 has no PEFT module for; only query, key, value, "
                "attention_output, feedforward_intermediate_dense and "
                "feedforward_output_dense can be exported."
            )
        block, role = where[id(layer)]
        module = next(m for m, roles in _MODULE_ROLES.items() if role in roles)
        modules.setdefault((block, module), {})[role] = layer
    return dict(sorted(modules.items()))


def _fused_module(block, module, layers, slots, use_rslora) -> _Module:
    """The PEFT factors and alpha of one module from its Keras LoraLayers.

    `layers` maps the module's wrapped roles to their LoraLayers; `slots`
    gives every role's layer (wrapped or not) for the row offsets in B.
    """
    scales = {role: layer.scale for role, layer in layers.items()}
    scale = next(iter(scales.values()))
    if not all(math.isclose(s, scale, rel_tol=1e-9) for s in scales.values()):
        # One fused adapter has one scaling; folding the ratios into B
        # would change how the adapter trains further.
        raise ValueError(
            f"query, key and value of block {block} share one PEFT module "
            f"(attn.c_attn), which has one scaling, but their LoRA scales "
            f"differ: {scales}. Give them the same alpha / rank (inject them "
            "in one `inject_lora` call)."
        )
    rank = sum(layer.rank for layer in layers.values())
    # Choose lora_alpha so that PEFT's scaling is the Keras scale.
    alpha = _tidy(scale * (math.sqrt(rank) if use_rslora else rank))
    roles = _MODULE_ROLES[module]
    fan_in = split_kernel(_base(slots[block, roles[0]])).fan_in
    fan_outs = [split_kernel(_base(slots[block, role])).fan_out for role in roles]
    lora_a = np.zeros((rank, fan_in), "float32")
    lora_b = np.zeros((sum(fan_outs), rank), "float32")
    row = col = 0
    for role, fan_out in zip(roles, fan_outs, strict=True):
        layer = layers.get(role)
        if layer is not None:
            cols = slice(col, col + layer.rank)
            a = _to_numpy(layer.lora_a).reshape(fan_in, layer.rank)
            b = _to_numpy(layer.lora_b).reshape(layer.rank, fan_out)
            lora_a[cols] = a.T
            lora_b[row : row + fan_out, cols] = b.T
            col = cols.stop
        row += fan_out
    return _Module(rank=rank, alpha=alpha, lora_a=lora_a, lora_b=lora_b)


def _tidy(value: float) -> int | float:
    """`value` as an int when it is one (up to rounding), for a tidy config."""
    rounded = round(value)
    if math.isclose(value, rounded, rel_tol=1e-12, abs_tol=1e-12):
        return int(rounded)
    return float(value)


def _to_numpy(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable.value), "float32")


def _base(layer):
    return layer.original_layer if isinstance(layer, LoraLayer) else layer


def _common_dropout(wrapped) -> float:
    rates = {layer.dropout for layer in wrapped}
    if len(rates) > 1:
        raise ValueError(
            "PEFT has one `lora_dropout` per adapter, but the LoraLayers use "
            f"several: {sorted(rates)}. Use one dropout rate to export."
        )
    return rates.pop()


def _peft_config(
    modules, *, use_rslora, dropout, num_blocks, hf_model, base_model_name_or_path
) -> dict:
    """A LoraConfig dict: the most common rank and alpha, patterns for the rest."""
    rank = collections.Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = collections.Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    # Pattern keys are regexes PEFT matches at the end of a module name
    # ("transformer.h.0.attn.c_attn"); escaped, each names one module.
    rank_pattern = {
        re.escape(f"h.{b}.{m}"): f.rank
        for (b, m), f in modules.items()
        if f.rank != rank
    }
    alpha_pattern = {
        re.escape(f"h.{b}.{m}"): f.alpha
        for (b, m), f in modules.items()
        if f.alpha != alpha
    }
    names = sorted({m for _, m in modules})
    if set(modules) != {(b, m) for b in range(num_blocks) for m in names}:
        # Not every block has the same modules: name each one.
        names = [f"h.{b}.{m}" for b, m in modules]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hf_model == "GPT2LMHeadModel" else None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "lora_dropout": dropout,
        "target_modules": names,
        # GPT-2's projections are transformers Conv1D, weight (in, out).
        "fan_in_fan_out": True,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _read_config(path: str) -> dict:
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


def _check_config(config: dict) -> None:
    """Raise `ValueError` for any option that changes what LoRA computes."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"The adapter is of type {peft_type!r}; only PEFT LoRA adapters "
            "(peft_type 'LORA') can be imported."
        )
    if config.get("use_dora"):
        raise ValueError(
            "The adapter uses DoRA (`use_dora=True`), which rescales each "
            "weight column by a learned magnitude; keras_lora's LoraLayer "
            "is plain LoRA and cannot represent it exactly."
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
            "so its factors do not fit the original GPT-2. Convert it to a "
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
    auto_mapping = config.get("auto_mapping")
    base_class = (
        auto_mapping.get("base_model_class") if isinstance(auto_mapping, dict) else None
    )
    if base_class is not None and not str(base_class).startswith("GPT2"):
        raise ValueError(
            f"The adapter is for a {base_class}; only GPT-2 adapters map onto "
            "keras-hub GPT-2."
        )
    dropout = config.get("lora_dropout") or 0.0
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"Invalid `lora_dropout={dropout!r}` in the adapter config.")


def _read_tensors(path: str) -> dict[str, np.ndarray]:
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


def _read_modules(config, tensors, backbone) -> dict[tuple[int, str], _Module]:
    """Validate every key and shape; return `(block, module) -> _Module`."""
    factors = collections.defaultdict(dict)
    prefixes = set()
    for key, value in tensors.items():
        match = _KEY_PATTERN.fullmatch(key)
        if match is None:
            raise ValueError(
                f"The adapter has a key that does not map onto keras-hub "
                f"GPT-2: '{key}'. Supported: "
                "base_model.model.[transformer.]h.{i}.{attn.c_attn, "
                "attn.c_proj, mlp.c_fc, mlp.c_proj}.lora_{A,B}.weight."
            )
        prefixes.add(match["prefix"])
        block, module = int(match["block"]), match["module"]
        factors[block, module][match["factor"]] = value
    if not factors:
        raise ValueError("The adapter has no LoRA weights.")
    if len(prefixes) > 1:
        raise ValueError(
            "The adapter mixes keys with and without 'transformer.'; they "
            "come from two different base models."
        )
    prefix = prefixes.pop()
    num_blocks = len(backbone.transformer_layers)
    slots = _slots(backbone)
    modules = {}
    for (block, module), pair in sorted(factors.items()):
        name = f"{prefix}h.{block}.{module}"
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"Module '{name}' has no {missing} weight.")
        if block >= num_blocks:
            raise ValueError(
                f"The adapter adapts block {block} ('{name}'), but the model "
                f"has {num_blocks} transformer layers."
            )
        rank, alpha = _module_rank_alpha(config, name)
        layers = [slots[block, role] for role in _MODULE_ROLES[module]]
        fan_in = split_kernel(layers[0]).fan_in
        fan_out = sum(split_kernel(layer).fan_out for layer in layers)
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.shape != (rank, fan_in) or lora_b.shape != (fan_out, rank):
            raise ValueError(
                f"Shape mismatch for '{name}': lora_A {lora_a.shape} and "
                f"lora_B {lora_b.shape}, but rank {rank} on this model needs "
                f"lora_A {(rank, fan_in)} and lora_B {(fan_out, rank)}."
            )
        for factor in (lora_a, lora_b):
            # bfloat16 (from ml_dtypes) is not a NumPy floating subtype.
            if not (
                np.issubdtype(factor.dtype, np.floating)
                or factor.dtype.name == "bfloat16"
            ):
                raise ValueError(
                    f"'{name}' has {factor.dtype} factors; LoRA factors must "
                    "be floating point."
                )
        modules[block, module] = _Module(
            rank=rank,
            alpha=alpha,
            lora_a=lora_a.astype("float32"),
            lora_b=lora_b.astype("float32"),
        )
    return modules


def _module_rank_alpha(config: dict, name: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives a module ("transformer.h.0.attn.c_attn")."""
    # PEFT's LoraConfig defaults, for configs that leave them out.
    rank = _pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
    alpha = _pattern_value(
        config.get("alpha_pattern"), name, config.get("lora_alpha", 8)
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
