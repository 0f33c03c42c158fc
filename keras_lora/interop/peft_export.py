"""Export LoRA adapters of keras-hub models as Hugging Face PEFT adapters.

How layers map onto PEFT modules (fused projections, the embedding and a
tied head) is described in `keras_lora.interop.peft_modules`; the file
format is `keras_lora.interop.peft_format`.
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np

from keras_lora.adapter_state import names_in
from keras_lora.embedding import LoraEmbedding
from keras_lora.interop import peft_format
from keras_lora.interop.hf_layout import HfLayout
from keras_lora.interop.peft_format import PeftModule
from keras_lora.interop.peft_modules import (
    KEY_ROOT,
    Located,
    hf_module_name,
    join_and,
    locate,
    to_numpy,
)
from keras_lora.quantized import dequantized_kernel


def export_peft(
    model: keras.layers.Layer,
    path: str | os.PathLike,
    *,
    hf_model: str | None = None,
    base_model_name_or_path: str | None = None,
    adapter_name: str | None = None,
) -> str:
    """Write the LoRA factors of a keras-hub model as a PEFT adapter.

    The directory loads with `peft.PeftModel.from_pretrained(base, path)`
    on the transformers model holding the same base weights, and computes
    the same outputs. The factors of the roles that share one Hugging Face
    module (a fused projection) fuse into one adapter whose rank
    is the sum of their ranks; its `lora_alpha` is chosen so that PEFT's
    scaling equals the Keras layers' `scale`. Modules whose rank or alpha
    differ from the most common ones go into `rank_pattern` /
    `alpha_pattern`.

    A PiSSA/OLoRA adapter (residual kernels) is written as PEFT converts
    one: a LoRA of twice its rank that applies to the ORIGINAL base
    weights (see `keras_lora.initialization.ResidualKernel`).

    Args:
        model: a keras-hub backbone or task model of a family in
            `keras_lora.families` with `LoraLayer`s (from `inject_lora`) on
            any of the family's `roles`.
        path: directory to write (created if needed; files are replaced).
        hf_model: the transformers class the adapter is for, one of the
            family's `hf_model_prefixes`; by default the first (the class
            with the language-model head).
        base_model_name_or_path: recorded in the config for reference.
        adapter_name: which adapter to write (a PEFT directory holds one);
            required when the model holds several.

    Returns:
        The directory path, as a string.

    Raises:
        ValueError: if the model is of no known family, has no `LoraLayer`,
            holds several adapters and `adapter_name` is missing or names
            none of them, has one on a layer the family has no PEFT module for, or its
            factors need what one PEFT config cannot say: roles of one
            fused module with different scales, different dropout rates,
            or DoRA on some layers and LoRA without it on others.

    Example (a tiny GPT-2 and back):

    >>> import json, os, tempfile, keras_hub
    >>> from keras_lora import import_peft, inject_lora, lora_layers
    >>> def tiny_gpt2():
    ...     backbone = keras_hub.models.GPT2Backbone(
    ...         vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
    ...         intermediate_dim=32, max_sequence_length=16)
    ...     return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    >>> lm = inject_lora(tiny_gpt2(), rank=4, alpha=8.0, targets=("query", "value"))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     adapter = export_peft(lm, tmp)
    ...     with open(os.path.join(adapter, "adapter_config.json")) as f:
    ...         config = json.load(f)
    ...     other = import_peft(tiny_gpt2(), adapter)
    >>> config["r"], config["lora_alpha"]  # query + value fused: rank 8
    (8, 16)
    >>> [(layer.name, layer.rank) for layer in lora_layers(other)]
    [('query', 8), ('key', 8), ('value', 8)]
    """
    found = locate(model)
    family = found.family
    if hf_model is None:
        hf_model = next(iter(family.hf_model_prefixes))
    if hf_model not in family.hf_model_prefixes:
        raise ValueError(
            f"`hf_model` must be one of {sorted(family.hf_model_prefixes)}. "
            f"Received: hf_model={hf_model!r}"
        )
    wrapped = [layer for _, layer in found.lora]
    if not wrapped:
        raise ValueError(
            f"Model '{model.name}' has no LoraLayer to export. Call "
            "`inject_lora(model)` first."
        )
    name = _adapter_to_export(model, wrapped, adapter_name)
    adapters = [layer.adapters[name] for layer in wrapped if name in layer.adapters]
    use_rslora = all(adapter.use_rslora for adapter in adapters)
    use_dora = _common_dora(wrapped, name)
    modules = {
        (block, module): _fused_module(
            found, block, module, records, use_rslora, use_dora
        )
        for (block, module), records in _group_by_module(found, name).items()
    }
    names = {key: hf_module_name(family, *key) for key in modules}
    targets = sorted({module for _, module in modules})
    if set(modules) != {(b, m) for b in range(found.num_blocks) for m in targets}:
        # Not every block has the same modules: name each one.
        targets = list(names.values())
    prefix = KEY_ROOT + family.hf_model_prefixes[hf_model]
    named = {names[key]: fused for key, fused in modules.items()}
    keyed = {prefix + names[key]: fused for key, fused in modules.items()}
    extra = _export_embedding(found, name, hf_model, use_rslora)
    for module_name, key, module in extra:
        named[module_name], keyed[key] = module, module
        targets.append(module_name)
    config = peft_format.lora_config(
        named,
        ensure_weight_tying=len(extra) > 1,  # The tied head is exported.
        target_modules=targets,
        use_rslora=use_rslora,
        dropout=_common_dropout(adapters),
        fan_in_fan_out=family.fan_in_fan_out,
        task_type=family.hf_task_types.get(hf_model),
        base_model_name_or_path=base_model_name_or_path,
        use_dora=use_dora,
    )
    return peft_format.write_adapter(os.fspath(path), config, keyed)


def _adapter_to_export(model, wrapped, adapter_name) -> str:
    """The adapter `export_peft` writes: `adapter_name`, or the only one."""
    known = list(names_in(wrapped))
    if adapter_name is None:
        if len(known) > 1:
            # A PEFT directory holds one adapter: never guess which.
            raise ValueError(
                f"Model '{model.name}' holds several adapters {known}; a PEFT "
                "adapter directory holds one. Pass `adapter_name=` to say "
                "which to export."
            )
        return known[0]
    if adapter_name not in known:
        raise ValueError(
            f"Model '{model.name}' has no adapter {adapter_name!r}; its "
            f"adapters are {known}."
        )
    return adapter_name


def _group_by_module(found: Located, name: str) -> dict:
    """Adapter `name`'s records by PEFT module: `(block, module) -> {role:
    keras_lora.adapter_state.Adapter}`, for the layers that hold it."""
    family = found.family
    where = {
        found.path(block, role): (block, role)
        for block in range(found.num_blocks)
        for role in family.roles
    }
    modules = {}
    for path, layer in found.lora:
        if name not in layer.adapters or isinstance(layer, LoraEmbedding):
            continue  # An embedding is exported on its own.
        if path not in where:
            raise ValueError(
                f"LoraLayer '{layer.name}' wraps a layer that transformers' "
                f"{family.label} has no PEFT module for; only "
                f"{join_and(family.roles)} can be exported."
            )
        block, role = where[path]
        module = family.projection(role).hf_module
        modules.setdefault((block, module), {})[role] = layer.adapters[name]
    return dict(sorted(modules.items()))


def _fused_module(found, block, module, layers, use_rslora, use_dora) -> PeftModule:
    """The PEFT factors and alpha of one module from its Keras LoraLayers.

    `layers` maps the module's wrapped roles to the exported adapter's
    records (`keras_lora.adapter_state.Adapter`: rank, scale, factors); every role
    of the module (wrapped or not) gives its rows of B.
    """
    roles = found.family.hf_modules[module]
    scales = {role: layer.scale for role, layer in layers.items()}
    scale = next(iter(scales.values()))
    if not all(math.isclose(s, scale, rel_tol=1e-9) for s in scales.values()):
        # One fused adapter has one scaling; folding the ratios into B
        # would change how the adapter trains further.
        raise ValueError(
            f"{join_and(roles)} of block {block} share one PEFT module "
            f"({module}), which has one scaling, but their LoRA scales "
            f"differ: {scales}. Give them the same alpha / rank (inject them "
            "in one `inject_lora` call)."
        )
    # PiSSA/OLoRA layers export their rank-2r equivalent for the original
    # base weights (PEFT's conversion); other layers are themselves.
    converted = {role: a.factors_for_original_kernel() for role, a in layers.items()}
    rank = sum(p[2] for p in converted.values())
    # Choose lora_alpha so that PEFT's scaling is the Keras scale.
    alpha = peft_format.tidy(scale * (math.sqrt(rank) if use_rslora else rank))
    layouts = [found.hf_layout(block, role) for role in roles]
    lora_a = np.zeros((rank, layouts[0].fan_in), "float32")
    lora_b = np.zeros((sum(x.fan_out for x in layouts), rank), "float32")
    magnitude = np.zeros(lora_b.shape[:1], "float32") if use_dora else None
    row = col = 0
    for role, layout in zip(roles, layouts, strict=True):
        adapter = layers.get(role)
        rows = slice(row, row + layout.fan_out)
        if adapter is not None:
            a, b, role_rank, _ = converted[role]
            cols = slice(col, col + role_rank)
            lora_a[cols] = layout.a_to_hf(a)
            lora_b[rows, cols] = layout.b_to_hf(b)
            col = cols.stop
        if use_dora and adapter is not None:
            magnitude[rows] = _magnitude_to_hf(layout, to_numpy(adapter.magnitude))
        elif use_dora:
            # No LoRA on this role: its B rows are zero, and magnitudes
            # equal to its column norms leave its outputs as they are.
            base = found.layer(block, role)
            base = getattr(base, "original_layer", base)  # Another adapter's.
            kernel = layout.kernel_to_hf(to_numpy(dequantized_kernel(base)))
            magnitude[rows] = np.linalg.norm(kernel, axis=1)
        row = rows.stop
    return PeftModule(rank, alpha, lora_a, lora_b, magnitude)


def _magnitude_to_hf(layout: HfLayout, magnitude: np.ndarray) -> np.ndarray:
    """A Keras magnitude (`out_shape`) -> PEFT's (fan_out,): as a B of rank 1."""
    return layout.b_to_hf(magnitude[None])[:, 0]


def _common_dora(wrapped, name: str) -> bool:
    """PEFT's one `use_dora` flag for adapter `name`, or `ValueError` if
    the layers differ."""
    dora = {
        layer.name: layer.adapters[name].use_dora
        for layer in wrapped
        if name in layer.adapters
    }
    flags = set(dora.values())
    if len(flags) > 1:
        dora = sorted(layer for layer, flag in dora.items() if flag)
        raise ValueError(
            "PEFT has one `use_dora` per adapter, but only some LoraLayers "
            f"use DoRA ({dora[:4]}). Inject every layer with the same "
            "`use_dora` to export."
        )
    return flags.pop()


def _common_dropout(adapters) -> float:
    rates = {adapter.dropout for adapter in adapters}
    if len(rates) > 1:
        raise ValueError(
            "PEFT has one `lora_dropout` per adapter, but the LoraLayers use "
            f"several: {sorted(rates)}. Use one dropout rate to export."
        )
    return rates.pop()


def _embedding_wrapper(found: Located, name: str) -> LoraEmbedding | None:
    """The `LoraEmbedding` holding adapter `name`, if any; `ValueError` for
    one PEFT has no module for."""
    family = found.family
    for path, layer in found.lora:
        if not isinstance(layer, LoraEmbedding) or name not in layer.adapters:
            continue
        if path != family.embedding or not family.hf_embedding:
            raise ValueError(
                f"Embedding '{layer.name}' has LoRA, but transformers' "
                f"{family.label} has no PEFT embedding module keras_lora maps "
                f"it onto (supported: the token embedding '{family.embedding}' "
                "of families whose data names `hf_embedding`). Leave it out "
                "of `targets` to export."
            )
        return layer
    return None


def _export_embedding(found: Located, name: str, hf_model: str, use_rslora):
    """`[(module name, key prefix, PeftModule)]` of the embedding's adapter
    `name`: the embedding, and for a tied one the output head too."""
    layer = _embedding_wrapper(found, name)
    if layer is None:
        return []
    family = found.family
    adapter = layer.adapters[name]
    a, b = to_numpy(adapter.lora_a), to_numpy(adapter.lora_b)
    rank = adapter.rank
    alpha = peft_format.tidy(adapter.scale * (math.sqrt(rank) if use_rslora else rank))
    prefix = KEY_ROOT + family.hf_model_prefixes[hf_model]
    table = peft_format.PeftModule(rank, alpha, a.T, b.T, embedding=True)
    out = [(family.hf_embedding, prefix + family.hf_embedding, table)]
    head = family.hf_output_heads.get(hf_model)
    if head and layer.tied and layer.adapt_head:
        # PEFT's tied head: lora_A = embedding B, lora_B = embedding A
        # (`LoraModel._create_and_replace` with `target_modules_to_tie`).
        out.append((head, KEY_ROOT + head, peft_format.PeftModule(rank, alpha, b, a)))
    return out
