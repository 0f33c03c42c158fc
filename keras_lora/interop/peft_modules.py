"""Where a keras-hub model's LoRA layers sit in a Hugging Face PEFT adapter.

This module holds the lookup both directions share: the model walked once
(its family, its layers by path, `Located`), the PEFT module names and key
root; `peft_export` and `peft_import` write and read adapters with it.

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

import dataclasses
from collections.abc import Iterable

import keras
import numpy as np

from keras_lora import _keras_internals
from keras_lora.families import FAMILIES, Family, family_of
from keras_lora.interop.hf_layout import HfLayout, hf_layout
from keras_lora.kernel_split import KernelSplit, split_kernel
from keras_lora.layer import LoraLayer
from keras_lora.surgery import walk_layers

# Every PEFT key starts with this (PeftModel's `base_model.model`).
KEY_ROOT = "base_model.model."


@dataclasses.dataclass
class Located:
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
        for child in _keras_internals.sublayers(parent):
            if isinstance(child, LoraLayer) and child.original_layer is original:
                return child
        raise RuntimeError(f"No LoraLayer wraps '{path}' after wrapping it.")


def locate(model: keras.layers.Layer) -> Located:
    """Find the model's family, and index its layers in one walk.

    Args:
        model: a keras-hub backbone or task model of a family in
            `keras_lora.families`.

    Raises:
        ValueError: for a model of no known family.
    """
    try:
        family = family_of(model)
    except ValueError as e:
        labels = join_and([f.label for f in FAMILIES])
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
    return Located(family, backbone, layers, lora, num_blocks)


def hf_module_name(family: Family, block: int, module: str) -> str:
    """A module's name below the model prefix: `hf_block`, then `module`.

    Args:
        family: the model's family.
        block: the block index.
        module: the Hugging Face module below the block (`hf_module`).
    """
    return f"{family.hf_block.format(block=block)}.{module}"


def join_and(items: Iterable[str]) -> str:
    """Items for a message: "a, b and c".

    Args:
        items: the strings, at least one.
    """
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def to_numpy(value) -> np.ndarray:
    """A variable's value (or a tensor) as a float32 NumPy array.

    Args:
        value: a Keras variable or a backend tensor.
    """
    value = getattr(value, "value", value)
    return np.asarray(keras.ops.convert_to_numpy(value), "float32")
