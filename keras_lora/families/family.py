"""What keras-lora needs to know about one keras-hub model family, as data.

A family module (`gpt2.py`, ...) builds one `Family` and nothing else; the
code that uses it (PEFT exchange, layout maps, default targets, benchmarks,
tests) reads these fields instead of knowing any model by name.

Paths are `keras_lora.layer_paths` paths below the backbone, with
`{block}` standing for the block index:

| field | GPT-2 |
| --- | --- |
| `block` | `transformer_layer_{block}` |
| `projections[i].path` | `self_attention/query`, ... (below a block) |
| `projections[i].hf_module` | the fused q/k/v Conv1D, ... (below `hf_block`) |
| `hf_block` | `h.{block}` |

`Projection.axes` says how the layer's Keras kernel maps onto the Hugging
Face weight matrix (out_features, in_features): it names the kernel's axes
and lists the ones Hugging Face flattens into its input and output
features, major first (`DENSE`, `HEADS_OUT`, ... below). The exchange
engine (`keras_lora.interop.hf_layout`) reads only this, so a family whose
kernels are laid out differently is new data, not new code.

`sharding` says how `families.layout.layout_map` lays the family's weights
out over a device mesh; its axes name `MODEL` (the mesh's model axis),
`HIDDEN` (the hidden-size axes: the model axis when the embeddings are
sharded, else replicated) or `None` (replicated).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelAxes:
    """How a Keras kernel's axes make up a Hugging Face (out, in) weight.

    Args:
        kernel: a name for each kernel axis, in kernel order
            (("heads", "hidden", "head_dim") for Gemma's query).
        hf_out: the axes Hugging Face's output features flatten, major
            first (("heads", "head_dim"): row `h * head_dim + d`).
        hf_in: the axes its input features flatten, major first.

    Every kernel axis is in exactly one of `hf_in` and `hf_out`; which ones
    are contracted is also what the layer's equation says, and the engine
    checks that the two agree.
    """

    kernel: tuple[str, ...]
    hf_out: tuple[str, ...]
    hf_in: tuple[str, ...]


# The layouts keras-hub's decoder families use (sizes from the layer).
# A Dense kernel is (in, out); Hugging Face stores nn.Linear as (out, in).
DENSE = KernelAxes(kernel=("in", "out"), hf_out=("out",), hf_in=("in",))
# Query/key/value as EinsumDense (hidden, heads, head_dim): Hugging Face's
# q_proj rows are head-major, row h * head_dim + d (GPT-2, Llama, ...).
# Grouped-query key/value kernels have fewer heads: the sizes come from the
# layer, so the same layout serves.
HEADS_OUT = KernelAxes(
    kernel=("hidden", "heads", "head_dim"),
    hf_out=("heads", "head_dim"),
    hf_in=("hidden",),
)
# Attention output (heads, head_dim, hidden): o_proj's columns are the
# heads' outputs concatenated, head-major.
HEADS_IN = KernelAxes(
    kernel=("heads", "head_dim", "hidden"),
    hf_out=("hidden",),
    hf_in=("heads", "head_dim"),
)
# Gemma's head-major query/key/value kernels (heads, hidden, head_dim).
HEAD_MAJOR_OUT = KernelAxes(
    kernel=("heads", "hidden", "head_dim"),
    hf_out=("heads", "head_dim"),
    hf_in=("hidden",),
)


@dataclasses.dataclass(frozen=True)
class Projection:
    """One projection of a transformer block that LoRA can adapt.

    Args:
        role: the keras-hub layer's name, which is also what `inject_lora`
            targets match ("query").
        path: the layer's path below its block ("self_attention/query").
        hf_module: the Hugging Face module that holds it, below the block
            ("self_attn.q_proj"). Several roles sharing one module form a fused
            projection whose outputs are concatenated in `projections` order.
        axes: how the kernel maps onto the Hugging Face weight; `None`
            means every kernel axis flattens in kernel order (a Dense).
        bias: whether the layer (and its Hugging Face module) has a bias
            (Qwen2's query/key/value). LoRA never changes a bias; merged
            export and the family tests read this.
    """

    role: str
    path: str
    hf_module: str
    axes: KernelAxes | None = None
    bias: bool = False


# Symbolic mesh axes in `Sharding`: the model axis, and the hidden-size axes
# (sharded on the model axis only when the embeddings are).
MODEL = "model"
HIDDEN = "hidden"

# Megatron-style layouts the families share. Column-parallel layers are
# sharded on their output features (heads), row-parallel ones on their input
# features; a LoRA factor is sharded along its large axis, never its rank
# axis (measurements in `keras_lora.families.gpt2.gpt2_layout_map`).
COLUMN = {"kernel": (None, MODEL), "lora_a": (HIDDEN, None), "lora_b": (None, MODEL)}
ROW = {"kernel": (MODEL, None), "lora_a": (MODEL, None), "lora_b": (None, HIDDEN)}
# Kernel (hidden, heads, head_dim).
HEADS_COLUMN = {
    "kernel": (None, MODEL, None),
    "lora_a": (HIDDEN, None),
    "lora_b": (None, MODEL, None),
}
# Kernel (heads, hidden, head_dim): Gemma's head-major query/key/value.
HEAD_MAJOR_COLUMN = {
    "kernel": (MODEL, None, None),
    "lora_a": (HIDDEN, None),
    "lora_b": (None, MODEL, None),
}
# Kernel (heads, head_dim, hidden): the attention output.
HEADS_ROW = {
    "kernel": (MODEL, None, None),
    "lora_a": (MODEL, None, None),
    "lora_b": (None, HIDDEN),
}


@dataclasses.dataclass(frozen=True)
class Sharding:
    """Megatron-style layouts of one family's weights, LoRA factors included.

    Every layout is a tuple with one entry per variable axis: `MODEL`,
    `HIDDEN` or `None`.

    Args:
        embeddings: embedding variable path below the backbone
            ("token_embedding/embeddings") -> layout.
        projections: role -> variable name ("kernel", "lora_a", "lora_b")
            -> layout. Variables named nowhere are replicated.
    """

    embeddings: dict[str, tuple[str | None, ...]]
    projections: dict[str, dict[str, tuple[str | None, ...]]]


@dataclasses.dataclass(frozen=True)
class DecoderStack:
    """Where a block-diagonal attention mask reaches a backbone's layers.

    The packed forward (`keras_lora.recipes.sft.packed_model`) runs the
    causal LM's own graph with each of `layers` attending only within an
    example: the mask each layer builds in `attention_mask_method`
    (causal, sliding window) is narrowed by the block-diagonal one
    (`keras_lora._keras_internals.hub.narrowed_attention_masks`).

    Args:
        layers: the backbone attribute listing the transformer layers.
        attention_mask_method: the layers' (private) method that returns
            their (batch, query, key) attention mask.
    """

    layers: str = "transformer_layers"
    attention_mask_method: str = "_compute_self_attention_mask"


@dataclasses.dataclass(frozen=True)
class Family:
    """A keras-hub model family.

    Args:
        name: short name ("gpt2").
        backbone_class: the keras-hub backbone class name ("GPT2Backbone").
        block: the path template of one transformer block below the
            backbone, with `{block}` for its index.
        projections: every projection of a block LoRA can adapt, in the
            order Hugging Face concatenates fused outputs.
        default_targets: the roles `inject_lora` adapts by default.
        hf_block: the Hugging Face path template of one block.
        hf_model_prefixes: transformers model class -> the prefix of its
            block paths ("GPT2LMHeadModel" -> "transformer."); the first
            is the class `export_peft` writes for by default.
        fan_in_fan_out: whether Hugging Face stores these weights as
            (in, out) (GPT-2's Conv1D) rather than (out, in).
        title: the family's name in messages ("GPT-2").
        hf_class_prefix: how transformers class names of this family begin
            ("GPT2"): an adapter recorded for another class is refused.
        hf_task_types: transformers class -> the PEFT `task_type` of an
            adapter for it ("GPT2LMHeadModel" -> "CAUSAL_LM"); others: none.
        sharding: the layouts for `families.layout.layout_map`, if known.
        hf_export_requires: backbone config values keras-hub's transformers
            exporter needs to write the model faithfully (it writes a
            Gemma 2 as a Gemma: `{"use_post_ffw_norm": False, ...}`);
            `export_hf_model` refuses other values.
        embedding: the token embedding's path below the backbone (what
            `inject_lora(..., targets=...)` names to adapt it).
        hf_embedding: the Hugging Face module of the token embedding below
            the model prefix ("wte"); "" if PEFT exchange of embedding LoRA
            is not supported for the family.
        hf_output_heads: transformers class -> its output head module at
            the model's root ("lm_head"), which a tied embedding's update
            also goes through (exported as PEFT's tied head).
        decoder_stack: how the packed forward runs the backbone's layers
            with a block-diagonal attention mask; None: packing is refused
            with `packing_refusal`.
        packing_refusal: why examples of this family cannot share a row.
    """

    name: str
    backbone_class: str
    block: str
    projections: tuple[Projection, ...]
    default_targets: tuple[str, ...]
    hf_block: str
    hf_model_prefixes: dict[str, str]
    fan_in_fan_out: bool = False
    title: str = ""
    hf_class_prefix: str = ""
    hf_task_types: dict[str, str] = dataclasses.field(default_factory=dict)
    sharding: Sharding | None = None
    hf_export_requires: dict[str, object] = dataclasses.field(default_factory=dict)
    embedding: str = "token_embedding"
    hf_embedding: str = ""
    hf_output_heads: dict[str, str] = dataclasses.field(default_factory=dict)
    decoder_stack: DecoderStack | None = None
    packing_refusal: str = ""

    @property
    def label(self) -> str:
        """The family's name for messages: `title`, else `name`."""
        return self.title or self.name

    @property
    def roles(self) -> tuple[str, ...]:
        """Every adaptable role, in `projections` order."""
        return tuple(p.role for p in self.projections)

    @property
    def hf_modules(self) -> dict[str, tuple[str, ...]]:
        """Hugging Face module -> the roles it holds, in output order."""
        modules: dict[str, tuple[str, ...]] = {}
        for p in self.projections:
            modules[p.hf_module] = modules.get(p.hf_module, ()) + (p.role,)
        return modules

    def projection(self, role: str) -> Projection:
        for p in self.projections:
            if p.role == role:
                return p
        raise ValueError(
            f"{self.name} has no projection {role!r}; it has {', '.join(self.roles)}."
        )
