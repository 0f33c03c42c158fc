"""Exchange LoRA adapters with Hugging Face PEFT, for every known family.

The family module (`keras_lora.families`) says everything model-specific:
where each adaptable projection of a block lives (`Projection.path` below
`Family.block`) and which Hugging Face module holds it (`hf_module` below
`hf_block`). A PEFT adapter for the transformers class `C` then has the keys

    base_model.model.{hf_model_prefixes[C]}{hf_block}.{hf_module}.lora_A.weight
    ...lora_B.weight

shaped (rank, fan_in) and (fan_out, rank); the file format itself is
`keras_lora.interop.peft_format`.

How each Keras kernel's axes become the (out, in) features of the Hugging
Face weight is family data too (`Projection.axes`), applied by one
mechanism (`keras_lora.interop.hf_layout`): transposes, head splits,
grouped-query key/value heads and head-major kernels are all a permutation
and a reshape of the factors.

Several roles sharing one `hf_module` form a fused projection
(`Family.hf_modules`): its outputs are the roles' outputs concatenated in
`projections` order. Separate factors for the roles are therefore one fused adapter of
rank `sum(ranks)`: A stacks their A's, B is block-diagonal (zero rows for a
role without LoRA). Going back, every row block of a fused B takes the
whole (shared) A. Both directions are exact: the same function, not an
approximation.

A token embedding wrapped by a `LoraEmbedding` (`Family.embedding`) is
PEFT's `lora.Embedding` on `Family.hf_embedding`: keys
`...{hf_embedding}.lora_embedding_A` (rank, vocabulary) = Aᵀ and
`...lora_embedding_B` (dim, rank) = Bᵀ. PEFT adapts only the lookup of an
embedding unless its output head is targeted too: a tied embedding
(GPT-2) therefore also exports the head (`Family.hf_output_heads`,
"lm_head") with the same factors transposed (`lora_A` = B, `lora_B` = A)
and `ensure_weight_tying: true`, so PEFT ties the head's adapter to the
embedding's and computes the same logits. On import, head factors must be
exactly that tie; an adapter of a tied embedding without them (PEFT
adapting the lookup only) becomes a lookup-only `LoraEmbedding`
(`adapt_head=False`), which computes what PEFT computes (and refuses to
merge: the tied head would move with the table).

DoRA adapters (`use_dora`) add `...lora_magnitude_vector`, shaped
(fan_out,): each role's magnitude, in the Hugging Face output order. A
fused module's roles without DoRA in Keras export their kernel's column
norms, which makes PEFT's rescaling of their columns exactly one; on import
every role of a fused module is wrapped, so each keeps its magnitudes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re

import keras
import numpy as np

from keras_lora.adapter_state import check_adapter_name, names_in
from keras_lora.embedding import LoraEmbedding, is_tied
from keras_lora.families import FAMILIES, Family, family_of
from keras_lora.injection import add_named_adapter, wrap_layers
from keras_lora.interop import peft_format
from keras_lora.interop.hf_layout import HfLayout, hf_layout
from keras_lora.interop.peft_format import PeftModule
from keras_lora.kernel_split import KernelSplit, split_kernel
from keras_lora.layer import LoraLayer
from keras_lora.quantized import dequantized_kernel
from keras_lora.surgery import LayerIndex, walk_layers

# Every PEFT key starts with this (PeftModel's `base_model.model`).
_KEY_ROOT = "base_model.model."


@dataclasses.dataclass
class _Located:
    """A keras-hub model, walked once: its family and its layers by path."""

    family: Family
    backbone: keras.layers.Layer
    layers: dict[str, keras.layers.Layer]  # Paths below the backbone.
    lora: list[tuple[str | None, LoraLayer]]  # Path below it, or None.
    num_blocks: int

    def path(self, block: int, role: str) -> str:
        projection = self.family.projection(role)
        return f"{self.family.block.format(block=block)}/{projection.path}"

    def layer(self, block: int, role: str) -> keras.layers.Layer:
        path = self.path(block, role)
        if path not in self.layers:
            raise ValueError(
                f"The {self.family.label} model has no layer '{path}' (role "
                f"{role!r} of block {block}); its keras-hub version lays its "
                "blocks out differently from `keras_lora.families."
                f"{self.family.name}`."
            )
        return self.layers[path]

    def split(self, block: int, role: str) -> KernelSplit:
        layer = self.layer(block, role)
        return layer.split if isinstance(layer, LoraLayer) else split_kernel(layer)

    def hf_layout(self, block: int, role: str) -> HfLayout:
        """How the layer's factors map onto PEFT's (the family's `axes`)."""
        return hf_layout(
            self.split(block, role),
            self.family.projection(role).axes,
            self.path(block, role),
        )

    def wrapper(self, block: int, role: str) -> LoraLayer:
        """The `LoraLayer` that now wraps the indexed layer (after a wrap).

        Looked up in its parent only: the index still holds the original.
        """
        return self.wrapper_at(self.path(block, role))

    def wrapper_at(self, path: str) -> LoraLayer:
        """The `LoraLayer` now wrapping the layer indexed at `path`."""
        original = self.layers[path]
        parent_path = path.rpartition("/")[0]
        parent = self.layers[parent_path] if parent_path else self.backbone
        for child in parent._layers:
            if isinstance(child, LoraLayer) and child.original_layer is original:
                return child
        raise RuntimeError(f"No LoraLayer wraps '{path}' after wrapping it.")


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
            or DoRA on some layers and plain LoRA on others.

    Example (a tiny GPT-2 and back):

    >>> import json, os, tempfile, keras_hub
    >>> from keras_lora import inject_lora, lora_layers
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
    found = _locate(model)
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
    names = {key: _module_name(family, *key) for key in modules}
    targets = sorted({module for _, module in modules})
    if set(modules) != {(b, m) for b in range(found.num_blocks) for m in targets}:
        # Not every block has the same modules: name each one.
        targets = list(names.values())
    prefix = _KEY_ROOT + family.hf_model_prefixes[hf_model]
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
    found = _locate(model)
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


def _locate(model) -> _Located:
    """Find the model's family, and index its layers in one walk."""
    try:
        family = family_of(model)
    except ValueError as e:
        labels = _and([f.label for f in FAMILIES])
        raise ValueError(
            f"PEFT exchange supports keras-hub {labels} models only: {e}"
        ) from None
    backbone = getattr(model, "backbone", model)
    walked = dict(walk_layers(model))
    prefix = ""
    if backbone is not model:
        prefix = next((p + "/" for p, x in walked.items() if x is backbone), None)
        if prefix is None:  # Not a tracked sublayer: index it on its own.
            prefix = "\0backbone/"
            walked.update((prefix + p, x) for p, x in walk_layers(backbone))
    layers = {p[len(prefix) :]: x for p, x in walked.items() if p.startswith(prefix)}
    lora = [
        (p[len(prefix) :] if p.startswith(prefix) else None, x)
        for p, x in walked.items()
        if isinstance(x, LoraLayer)
    ]
    num_blocks = 0
    while family.block.format(block=num_blocks) in layers:
        num_blocks += 1
    return _Located(family, backbone, layers, lora, num_blocks)


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


def _module_name(family: Family, block: int, module: str) -> str:
    """A module's name below the model prefix: `hf_block`, then `module`."""
    return f"{family.hf_block.format(block=block)}.{module}"


def _group_by_module(found: _Located, name: str) -> dict:
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
                f"{_and(family.roles)} can be exported."
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
            f"{_and(roles)} of block {block} share one PEFT module "
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
            magnitude[rows] = _magnitude_to_hf(layout, _to_numpy(adapter.magnitude))
        elif use_dora:
            # No LoRA on this role: its B rows are zero, and magnitudes
            # equal to its column norms leave its outputs as they are.
            base = found.layer(block, role)
            base = getattr(base, "original_layer", base)  # Another adapter's.
            kernel = layout.kernel_to_hf(_to_numpy(dequantized_kernel(base)))
            magnitude[rows] = np.linalg.norm(kernel, axis=1)
        row = rows.stop
    return PeftModule(rank, alpha, lora_a, lora_b, magnitude)


def _magnitude_to_hf(layout: HfLayout, magnitude: np.ndarray) -> np.ndarray:
    """A Keras magnitude (`out_shape`) -> PEFT's (fan_out,): as a B of rank 1."""
    return layout.b_to_hf(magnitude[None])[:, 0]


def _magnitude_from_hf(layout: HfLayout, magnitude: np.ndarray) -> np.ndarray:
    """PEFT's magnitude (fan_out,) -> Keras's, shaped `out_shape`."""
    return layout.b_from_hf(magnitude[:, None])[0]


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


def _to_numpy(value) -> np.ndarray:
    """A variable's value (or a tensor) as a float32 NumPy array."""
    value = getattr(value, "value", value)
    return np.asarray(keras.ops.convert_to_numpy(value), "float32")


def _common_dropout(adapters) -> float:
    rates = {adapter.dropout for adapter in adapters}
    if len(rates) > 1:
        raise ValueError(
            "PEFT has one `lora_dropout` per adapter, but the LoraLayers use "
            f"several: {sorted(rates)}. Use one dropout rate to export."
        )
    return rates.pop()


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
        re.escape(_KEY_ROOT) + rf"(?P<prefix>{prefixes}){block}\."
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
        f"{_KEY_ROOT}{prefix}{family.hf_block.format(block='{i}')}."
        f"{{{modules}}}.{{lora_A.weight, lora_B.weight, lora_magnitude_vector}}"
    )
    if family.hf_embedding:
        text += (
            f"; {_KEY_ROOT}{prefix}{family.hf_embedding}."
            "{lora_embedding_A, lora_embedding_B} (with a tied head, also "
            f"{_KEY_ROOT}{{{', '.join(sorted(set(family.hf_output_heads.values())))}}}"
            ".{lora_A.weight, lora_B.weight})"
        )
    return text


def _read_modules(found: _Located, config, tensors, allow_empty=False) -> dict:
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
            f"{_and([repr(_KEY_ROOT + p) for p in sorted(prefixes)])}; they "
            "come from different base models."
        )
    prefix = prefixes.pop()
    modules = {}
    for (block, module), pair in sorted(factors.items()):
        name = prefix + _module_name(family, block, module)
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


def _and(items) -> str:
    """ "a, b and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _embedding_wrapper(found: _Located, name: str) -> LoraEmbedding | None:
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


def _export_embedding(found: _Located, name: str, hf_model: str, use_rslora):
    """`[(module name, key prefix, PeftModule)]` of the embedding's adapter
    `name`: the embedding, and for a tied one the output head too."""
    layer = _embedding_wrapper(found, name)
    if layer is None:
        return []
    family = found.family
    adapter = layer.adapters[name]
    a, b = _to_numpy(adapter.lora_a), _to_numpy(adapter.lora_b)
    rank = adapter.rank
    alpha = peft_format.tidy(adapter.scale * (math.sqrt(rank) if use_rslora else rank))
    prefix = _KEY_ROOT + family.hf_model_prefixes[hf_model]
    table = peft_format.PeftModule(rank, alpha, a.T, b.T, embedding=True)
    out = [(family.hf_embedding, prefix + family.hf_embedding, table)]
    head = family.hf_output_heads.get(hf_model)
    if head and layer.tied and layer.adapt_head:
        # PEFT's tied head: lora_A = embedding B, lora_B = embedding A
        # (`LoraModel._create_and_replace` with `target_modules_to_tie`).
        out.append((head, _KEY_ROOT + head, peft_format.PeftModule(rank, alpha, b, a)))
    return out


def _read_embedding(found: _Located, config, tensors) -> tuple | None:
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
            re.escape(_KEY_ROOT) + rf"(?:(?:{prefixes})"
            + re.escape(family.hf_embedding) + r"|(?P<head>"
            + "|".join(map(re.escape, heads)) + r"))\.base_layer\.weight",
            key,
        )  # fmt: skip
        if family.hf_embedding and match:
            bases["head" if match["head"] else "table"] = (key, tensors.pop(key))
            continue
        if family.hf_embedding:
            match = re.fullmatch(
                re.escape(_KEY_ROOT) + rf"(?P<prefix>{prefixes})"
                + re.escape(family.hf_embedding) + r"\.lora_embedding_(?P<f>[AB])",
                key,
            )  # fmt: skip
            if match:
                table_keys[match["f"]] = (match["prefix"], tensors.pop(key))
                continue
        for head in heads:
            match = re.fullmatch(
                re.escape(_KEY_ROOT + head) + r"\.lora_(?P<f>[AB])\.weight", key
            )
            if match:
                head_keys[match["f"]] = (head, tensors.pop(key))
    if not table_keys:
        if head_keys or bases:
            raise ValueError(
                f"The adapter adapts the output head ({_and(heads)}) without "
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
    table = _to_numpy(original.embeddings)
    head = table
    if (
        not is_tied(original)
        and getattr(original, "reverse_embeddings", None) is not None
    ):
        head = _to_numpy(original.reverse_embeddings).T
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
