"""keras-hub Gemma and Gemma 2 (`GemmaBackbone`) and transformers'
`GemmaForCausalLM` / `Gemma2ForCausalLM`.

keras-hub layers (below `decoder_block_{i}`) and transformers modules
(below `model.layers.{i}`), with the converter's weight maps
(`keras_hub/src/utils/transformers/convert_gemma.py`):

| keras-hub layer | kernel | transformers weight (out, in) |
| --- | --- | --- |
| attention/query | (H, hidden, D) | q_proj (H*D, hidden) |
| attention/key | (K, hidden, D) | k_proj (K*D, hidden) |
| attention/value | (K, hidden, D) | v_proj (K*D, hidden) |
| attention/attention_output | (H, D, hidden) | o_proj (hidden, H*D) |
| ffw_gating | (hidden, inter) | mlp.gate_proj (inter, hidden) |
| ffw_gating_2 | (hidden, inter) | mlp.up_proj (inter, hidden) |
| ffw_linear | (inter, hidden) | mlp.down_proj (hidden, inter) |

The query/key/value kernels are head-major: the heads axis comes before
the contracted hidden axis, which `HEAD_MAJOR_OUT` says. (keras-hub's
`intermediate_dim` is twice transformers' `intermediate_size`; the layers
hold half of it each; H query heads, K key/value heads, head size D.)
"""

from keras_lora.families.family import (
    COLUMN,
    DENSE,
    HEAD_MAJOR_COLUMN,
    HEAD_MAJOR_OUT,
    HEADS_IN,
    HEADS_ROW,
    HIDDEN,
    ROW,
    DecoderStack,
    Family,
    Projection,
    Sharding,
)

GEMMA = Family(
    name="gemma",
    backbone_class="GemmaBackbone",
    block="decoder_block_{block}",
    projections=(
        Projection("query", "attention/query", "self_attn.q_proj", HEAD_MAJOR_OUT),
        Projection("key", "attention/key", "self_attn.k_proj", HEAD_MAJOR_OUT),
        Projection("value", "attention/value", "self_attn.v_proj", HEAD_MAJOR_OUT),
        Projection(
            "attention_output",
            "attention/attention_output",
            "self_attn.o_proj",
            HEADS_IN,
        ),
        Projection("ffw_gating", "ffw_gating", "mlp.gate_proj", DENSE),
        Projection("ffw_gating_2", "ffw_gating_2", "mlp.up_proj", DENSE),
        Projection("ffw_linear", "ffw_linear", "mlp.down_proj", DENSE),
    ),
    # PEFT's default for Gemma: q_proj and v_proj.
    default_targets=("query", "value"),
    hf_block="layers.{block}",
    hf_model_prefixes={
        "GemmaForCausalLM": "model.",
        "GemmaModel": "",
        "Gemma2ForCausalLM": "model.",
        "Gemma2Model": "",
    },
    title="Gemma",
    hf_class_prefix="Gemma",
    hf_task_types={"GemmaForCausalLM": "CAUSAL_LM", "Gemma2ForCausalLM": "CAUSAL_LM"},
    # keras-hub 0.32's exporter writes every GemmaBackbone as a Gemma (1)
    # config: Gemma 2's extra norms, soft caps and sliding window are lost.
    # `GemmaDecoderBlock` takes no attention mask argument; it builds its
    # causal mask in `_compute_attention_mask` (Gemma 2's sliding window is
    # applied after, in the attention layer).
    decoder_stack=DecoderStack(attention_mask_method="_compute_attention_mask"),
    hf_export_requires={
        "use_post_ffw_norm": False,
        "use_post_attention_norm": False,
        "final_logit_soft_cap": None,
        "attention_logit_soft_cap": None,
        "use_sliding_window_attention": False,
    },
    sharding=Sharding(
        # The output head is tied to the token embedding.
        embeddings={"token_embedding/embeddings": (None, HIDDEN)},
        projections={
            "query": HEAD_MAJOR_COLUMN,
            "key": HEAD_MAJOR_COLUMN,
            "value": HEAD_MAJOR_COLUMN,
            "attention_output": HEADS_ROW,
            "ffw_gating": COLUMN,
            "ffw_gating_2": COLUMN,
            "ffw_linear": ROW,
        },
    ),
)
