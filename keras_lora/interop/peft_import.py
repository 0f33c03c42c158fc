"""Import Hugging Face PEFT adapters into keras-hub models.

Every key and shape is checked against the model's family data before any
layer changes; how PEFT modules map onto layers (fused projections, the
embedding and a tied head) is described in `keras_lora.interop.peft_modules`.
"""

from __future__ import annotations

import collections
import math
import os
import re

import keras
import numpy as np

from keras_lora.adapter_state import check_adapter_name, names_in
from keras_lora.embedding import LoraEmbedding, is_tied
from keras_lora.families import Family
from keras_lora.injection import add_named_adapter, wrap_layers
from keras_lora.interop import peft_format
from keras_lora.interop.hf_layout import HfLayout
from keras_lora.interop.peft_modules import (
    KEY_ROOT,
    Located,
    hf_module_name,
    join_and,
    locate,
    to_numpy,
)
from keras_lora.layer import LoraLayer
from keras_lora.surgery import LayerIndex


def import_peft(
    model: keras.layers.Layer,
    path: str | os.PathLike,
    *,
    seed: int | None = None,
    adapter_name: str = "default",
) -> keras.layers.Layer:
    """Load a Hugging Face PEFT LoRA adapter into a keras-hub model.

    Each adapted module becomes `LoraLayer`s (all other weights are frozen,
    as by `inject_lora`) holding exactly the adapter's factors and scale: a
    fused module of rank r (several roles in one Hugging Face module) becomes
    one layer
    of rank r per role, all sharing its A and taking their rows of its B.
    `rank_pattern`, `alpha_pattern`, `use_rslora`, `lora_dropout` and
    `use_dora` (each role takes its part of the module's magnitude) carry
    over. The model must hold the base weights the adapter was trained on
    (keras-hub's `from_preset` reads a Hugging Face checkpoint directory).
    Into a model that holds other adapters, it is added beside them,
    inactive, as `inject_lora(..., adapter_name=...)` adds one
    (`set_adapter(model, adapter_name)` uses it).

    Everything is checked before the model changes: on error it is left as
    it was.

    Args:
        model: a keras-hub backbone or task model of a family in
            `keras_lora.families`, with or without adapters.
        path: a PEFT adapter directory (`adapter_config.json` and
            `adapter_model.safetensors`), as written by PEFT's
            `save_pretrained` or `export_peft`.
        seed: seed for the LoRA dropout.
        adapter_name: the name the adapter gets in the model; not one it
            holds already.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: if a file is missing (or only a pickled
            `adapter_model.bin` exists), the model is of no known family or
            already holds an adapter `adapter_name` (the message lists its
            adapters), or the adapter cannot be mapped
            exactly: not LoRA, `bias` other than "none", base-weight
            rewriting initialisations (PiSSA, OLoRA, LoftQ, ...), other
            options that change the forward pass, an adapter recorded for
            another architecture, keys for other modules, missing factors,
            shapes that do not fit the model.

    Example: see `export_peft`.
    """
    found = locate(model)
    family = found.family
    check_adapter_name(adapter_name)
    known = list(names_in(layer for _, layer in found.lora))
    if adapter_name in known:
        raise ValueError(
            f"Model '{model.name}' already holds adapter {adapter_name!r} "
            f"(adapters: {known}). Import it under another `adapter_name=`, "
            "or `delete_adapter` / `merge_lora` first."
        )
    path = os.fspath(path)
    config = peft_format.read_config(path)
    peft_format.check_config(config, base_model=f"the original {family.label}")
    _check_base_class(family, config)
    tensors = peft_format.read_tensors(path)
    read = _read_embedding(found, config, tensors)  # Takes its keys.
    embedding, lookup_only = read if read is not None else (None, False)
    modules = _read_modules(found, config, tensors, embedding is not None)
    common = dict(
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        seed=seed,
    )
    if config.get("use_dora"):
        common["use_dora"] = True
    settings = {
        id(found.layer(block, role)): dict(common, rank=fused.rank, alpha=fused.alpha)
        for (block, module), fused in modules.items()
        for role in family.hf_modules[module]
    }
    if embedding is not None:
        layer = found.layers[family.embedding]
        extra = {}
        if isinstance(layer, LoraEmbedding):
            if layer.adapt_head == lookup_only:
                raise ValueError(
                    f"The adapter {'leaves' if lookup_only else 'adapts'} the "
                    "tied output head, unlike the embedding's adapters in the "
                    f"model (adapt_head={layer.adapt_head}, one setting per "
                    "layer). Import it into a fresh base model."
                )
        elif lookup_only:
            extra["adapt_head"] = False
        settings[id(layer)] = dict(
            common, rank=embedding.rank, alpha=embedding.alpha, **extra
        )
    if found.lora:
        # Beside the adapters there: wrapped layers get more factors.
        add_named_adapter(model, settings, adapter_name, index=LayerIndex(model))
    else:
        # One call wraps every layer, each with its module's rank and
        # alpha, and freezes the rest, as `inject_lora` does.
        wrap_layers(
            model,
            {key: dict(kw, adapter_name=adapter_name) for key, kw in settings.items()},
        )
    for (block, module), fused in modules.items():
        row = 0
        for role in family.hf_modules[module]:
            layer = found.layer(block, role)
            if not isinstance(layer, LoraLayer):
                layer = found.wrapper(block, role)
            adapter = layer.adapters[adapter_name]
            layout = found.hf_layout(block, role)
            rows = slice(row, row + layout.fan_out)
            row = rows.stop
            adapter.lora_a.assign(layout.a_from_hf(fused.lora_a))
            adapter.lora_b.assign(layout.b_from_hf(fused.lora_b[rows]))
            if fused.use_dora:
                adapter.magnitude.assign(
                    _magnitude_from_hf(layout, fused.magnitude[rows])
                )
    if embedding is not None:
        layer = found.layers[family.embedding]
        if not isinstance(layer, LoraLayer):
            layer = found.wrapper_at(family.embedding)
        adapter = layer.adapters[adapter_name]
        adapter.lora_a.assign(np.ascontiguousarray(embedding.lora_a.T))
        adapter.lora_b.assign(np.ascontiguousarray(embedding.lora_b.T))
    return model


def _magnitude_from_hf(layout: HfLayout, magnitude: np.ndarray) -> np.ndarray:
    """PEFT's magnitude (fan_out,) -> Keras's, shaped `out_shape`."""
    return layout.b_from_hf(magnitude[:, None])[0]


def _check_base_class(family: Family, config: dict) -> None:
    """Refuse an adapter PEFT recorded for another architecture."""
    base_class = peft_format.base_model_class(config)
    if base_class is None or base_class in family.hf_model_prefixes:
        return
    if family.hf_class_prefix and base_class.startswith(family.hf_class_prefix):
        return
    raise ValueError(
        f"The adapter is for a {base_class}; only {family.label} adapters map "
        f"onto keras-hub {family.label}."
    )


def _key_pattern(family: Family) -> re.Pattern:
    """The PEFT keys of a family's adapters, with their parts as groups."""
    prefixes = "|".join(
        re.escape(p)
        for p in sorted(set(family.hf_model_prefixes.values()), key=len, reverse=True)
    )
    block = r"(?P<block>\d+)".join(
        re.escape(part) for part in family.hf_block.split("{block}")
    )
    modules = "|".join(re.escape(m) for m in family.hf_modules)
    return re.compile(
        re.escape(KEY_ROOT) + rf"(?P<prefix>{prefixes}){block}\."
        rf"(?P<module>{modules})\.(?:lora_(?P<factor>[AB])\.weight"
        r"|(?P<magnitude>lora_magnitude_vector)(?:\.weight)?)"
    )


def _key_help(family: Family) -> str:
    """The supported keys, for messages: optional prefixes in brackets,
    alternatives in braces, `{i}` for the block index."""
    prefixes = sorted(p for p in set(family.hf_model_prefixes.values()) if p)
    prefix = prefixes[0] if len(prefixes) == 1 else "{" + ", ".join(prefixes) + "}"
    if not prefixes:
        prefix = ""
    elif "" in family.hf_model_prefixes.values():
        prefix = f"[{prefix}]"
    modules = ", ".join(family.hf_modules)
    text = (
        f"{KEY_ROOT}{prefix}{family.hf_block.format(block='{i}')}."
        f"{{{modules}}}.{{lora_A.weight, lora_B.weight, lora_magnitude_vector}}"
    )
    if family.hf_embedding:
        text += (
            f"; {KEY_ROOT}{prefix}{family.hf_embedding}."
            "{lora_embedding_A, lora_embedding_B} (with a tied head, also "
            f"{KEY_ROOT}{{{', '.join(sorted(set(family.hf_output_heads.values())))}}}"
            ".{lora_A.weight, lora_B.weight})"
        )
    return text


def _read_modules(found: Located, config, tensors, allow_empty=False) -> dict:
    """Validate every key and shape; return `(block, module) -> PeftModule`
    (none needed with `allow_empty`: an adapter of the embedding alone)."""
    family = found.family
    pattern = _key_pattern(family)
    factors = collections.defaultdict(dict)
    prefixes = set()
    for key, value in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise ValueError(
                f"The adapter has a key that does not map onto keras-hub "
                f"{family.label}: '{key}'. Supported: {_key_help(family)}."
            )
        prefixes.add(match["prefix"])
        factor = "M" if match["magnitude"] else match["factor"]
        factors[int(match["block"]), match["module"]][factor] = value
    if not factors:
        if allow_empty:
            return {}
        raise ValueError("The adapter has no LoRA weights.")
    if len(prefixes) > 1:
        raise ValueError(
            "The adapter mixes keys under "
            f"{join_and([repr(KEY_ROOT + p) for p in sorted(prefixes)])}; they "
            "come from different base models."
        )
    prefix = prefixes.pop()
    modules = {}
    for (block, module), pair in sorted(factors.items()):
        name = prefix + hf_module_name(family, block, module)
        if block >= found.num_blocks:
            raise ValueError(
                f"The adapter adapts block {block} ('{name}'), but the model "
                f"has {found.num_blocks} blocks."
            )
        layouts = [found.hf_layout(block, r) for r in family.hf_modules[module]]
        modules[block, module] = peft_format.peft_module(
            config,
            name,
            pair,
            fan_in=layouts[0].fan_in,
            fan_out=sum(x.fan_out for x in layouts),
        )
    return modules


def _read_embedding(found: Located, config, tensors) -> tuple | None:
    """Take the embedding's (and a tied head's) keys out of `tensors` and
    check them: `(module, lookup_only)`, or None without such keys.
    `lookup_only`: a tied embedding whose head PEFT leaves as it is."""
    family = found.family
    prefixes = "|".join(
        re.escape(p)
        for p in sorted(set(family.hf_model_prefixes.values()), key=len, reverse=True)
    )
    heads = sorted(set(family.hf_output_heads.values()))
    table_keys, head_keys, bases = {}, {}, {}
    for key in list(tensors):
        # PEFT saves the base table (and head) beside an adapted embedding
        # (`save_embedding_layers="auto"`), for resized vocabularies.
        match = re.fullmatch(
            re.escape(KEY_ROOT) + rf"(?:(?:{prefixes})"
            + re.escape(family.hf_embedding) + r"|(?P<head>"
            + "|".join(map(re.escape, heads)) + r"))\.base_layer\.weight",
            key,
        )  # fmt: skip
        if family.hf_embedding and match:
            bases["head" if match["head"] else "table"] = (key, tensors.pop(key))
            continue
        if family.hf_embedding:
            match = re.fullmatch(
                re.escape(KEY_ROOT) + rf"(?P<prefix>{prefixes})"
                + re.escape(family.hf_embedding) + r"\.lora_embedding_(?P<f>[AB])",
                key,
            )  # fmt: skip
            if match:
                table_keys[match["f"]] = (match["prefix"], tensors.pop(key))
                continue
        for head in heads:
            match = re.fullmatch(
                re.escape(KEY_ROOT + head) + r"\.lora_(?P<f>[AB])\.weight", key
            )
            if match:
                head_keys[match["f"]] = (head, tensors.pop(key))
    if not table_keys:
        if head_keys or bases:
            raise ValueError(
                f"The adapter adapts the output head ({join_and(heads)}) without "
                "the token embedding; keras_lora maps a head adapter only as "
                "the tie of an embedding adapter (PEFT's ensure_weight_tying)."
            )
        return None
    if config.get("use_dora"):
        raise ValueError(
            "The adapter uses DoRA and adapts the token embedding; DoRA on "
            "embeddings is not supported by keras_lora."
        )
    layer = found.layers.get(family.embedding)
    original = getattr(layer, "original_layer", layer)
    if not isinstance(original, keras.layers.Embedding):
        raise ValueError(
            f"The adapter adapts the token embedding, but the model has no "
            f"embedding at '{family.embedding}'."
        )
    _check_saved_bases(family, original, bases)
    prefix = table_keys[next(iter(table_keys))][0]
    module_name = prefix + family.hf_embedding
    table = peft_format.peft_module(
        config,
        module_name,
        {f: value for f, (_, value) in table_keys.items()},
        fan_in=int(original.input_dim),
        fan_out=int(original.output_dim),
    )
    table.embedding = True
    lm_classes = [c for c, p in family.hf_model_prefixes.items() if p == prefix]
    has_head = any(c in family.hf_output_heads for c in lm_classes)
    if not is_tied(original):
        if head_keys:
            raise ValueError(
                f"The adapter adapts the output head, but the model's head is "
                f"not tied to '{family.embedding}'; keras_lora adapts an "
                "untied head's embedding lookup only. Import it without the "
                "head keys, or into a model with tied embeddings."
            )
        return table, False
    if not head_keys and has_head:
        # PEFT applies it to the lookup only; the tied head keeps the base
        # table. The LoraEmbedding computes the same (`adapt_head=False`).
        return table, True
    if head_keys:
        head = head_keys[next(iter(head_keys))][0]
        module = peft_format.peft_module(
            config,
            head,
            {f: value for f, (_, value) in head_keys.items()},
            fan_in=int(original.output_dim),
            fan_out=int(original.input_dim),
        )
        tied = (
            module.rank == table.rank
            and math.isclose(module.alpha, table.alpha)
            and np.array_equal(module.lora_a, table.lora_b.T)
            and np.array_equal(module.lora_b, table.lora_a.T)
        )
        if not tied:
            raise ValueError(
                f"The adapter's '{head}' factors are not the tie of "
                f"'{module_name}''s (lora_A = lora_embedding_Bᵀ, lora_B = "
                "lora_embedding_Aᵀ, same rank and alpha); a tied embedding "
                "holds one update for both."
            )
    return table, False


def _check_saved_bases(family: Family, original, bases: dict) -> None:
    """PEFT's saved copies of the base table / head must be the model's:
    an adapter for another (resized) vocabulary is refused."""
    table = to_numpy(original.embeddings)
    head = table
    if (
        not is_tied(original)
        and getattr(original, "reverse_embeddings", None) is not None
    ):
        head = to_numpy(original.reverse_embeddings).T
    for kind, (key, value) in bases.items():
        ours = table if kind == "table" else head
        value = np.asarray(value, "float32")
        if value.shape != ours.shape or np.max(np.abs(value - ours)) > 1e-5 * max(
            1.0, float(np.max(np.abs(ours)))
        ):
            raise ValueError(
                f"The adapter carries its own base weight '{key}' (shape "
                f"{value.shape}), which is not this model's {family.label} "
                f"{'embedding table' if kind == 'table' else 'output head'} "
                f"(shape {ours.shape}): it was trained on other base weights "
                "or a resized vocabulary. Import it into that base model."
            )
