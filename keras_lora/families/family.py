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

`sharding` says how `families.layout.layout_map` lays the family's weights
out over a device mesh; its axes name `MODEL` (the mesh's model axis),
`HIDDEN` (the hidden-size axes: the model axis when the embeddings are
sharded, else replicated) or `None` (replicated).
"""

from __future__ import annotations

import dataclasses


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
    """

    role: str
    path: str
    hf_module: str


# Symbolic mesh axes in `Sharding`: the model axis, and the hidden-size axes
# (sharded on the model axis only when the embeddings are).
MODEL = "model"
HIDDEN = "hidden"


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
