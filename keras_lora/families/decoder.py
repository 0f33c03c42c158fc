"""Shared data of the Llama-style decoders (Llama, Mistral, Qwen2).

keras-hub builds these three the same way, and transformers names their
modules the same way; each family module only adds what differs (backbone
and transformers class names, Qwen2's query/key/value biases).

keras-hub layers (below `transformer_layer_{i}`) and transformers modules
(below `model.layers.{i}`), with the converters' weight maps
(`keras_hub/src/utils/transformers/convert_llama3.py`, `convert_mistral.py`,
`convert_qwen.py`: `np.reshape(np.transpose(hf), keras_shape)`):

| keras-hub layer | kernel | transformers weight (out, in) |
| --- | --- | --- |
| self_attention/query | (hidden, H, D) | q_proj (H*D, hidden) |
| self_attention/key | (hidden, K, D) | k_proj (K*D, hidden) |
| self_attention/value | (hidden, K, D) | v_proj (K*D, hidden) |
| self_attention/attention_output | (H, D, hidden) | o_proj (hidden, H*D) |
| feedforward_gate_dense | (hidden, inter) | mlp.gate_proj (inter, hidden) |
| feedforward_intermediate_dense | (hidden, inter) | mlp.up_proj (inter, hidden) |
| feedforward_output_dense | (inter, hidden) | mlp.down_proj (hidden, inter) |

(H query heads, K key/value heads, head size D; inter = the feed-forward
size.) Grouped-query attention only makes key/value kernels smaller: the sizes
come from the layers, the layouts are the same.
"""

from __future__ import annotations

from keras_lora.families.family import (
    COLUMN,
    DENSE,
    HEADS_COLUMN,
    HEADS_IN,
    HEADS_OUT,
    HEADS_ROW,
    HIDDEN,
    ROW,
    DecoderStack,
    Projection,
    Sharding,
)


def projections(qkv_bias: bool = False) -> tuple[Projection, ...]:
    """The seven projections, in transformers' module order."""
    return (
        Projection(
            "query", "self_attention/query", "self_attn.q_proj", HEADS_OUT, qkv_bias
        ),
        Projection(
            "key", "self_attention/key", "self_attn.k_proj", HEADS_OUT, qkv_bias
        ),
        Projection(
            "value", "self_attention/value", "self_attn.v_proj", HEADS_OUT, qkv_bias
        ),
        Projection(
            "attention_output",
            "self_attention/attention_output",
            "self_attn.o_proj",
            HEADS_IN,
        ),
        Projection(
            "feedforward_gate_dense", "feedforward_gate_dense", "mlp.gate_proj", DENSE
        ),
        Projection(
            "feedforward_intermediate_dense",
            "feedforward_intermediate_dense",
            "mlp.up_proj",
            DENSE,
        ),
        Projection(
            "feedforward_output_dense",
            "feedforward_output_dense",
            "mlp.down_proj",
            DENSE,
        ),
    )


# Megatron-style: query/key/value and gate/up are column-parallel (sharded
# on heads / intermediate features), attention output and down are
# row-parallel. The model axis must divide the number of key/value heads as
# well as the query heads.
SHARDING = Sharding(
    embeddings={
        "token_embedding/embeddings": (None, HIDDEN),
        # Only when the output head is not tied to the embeddings.
        "token_embedding/reverse_embeddings": (HIDDEN, None),
    },
    projections={
        "query": HEADS_COLUMN,
        "key": HEADS_COLUMN,
        "value": HEADS_COLUMN,
        "attention_output": HEADS_ROW,
        "feedforward_gate_dense": COLUMN,
        "feedforward_intermediate_dense": COLUMN,
        "feedforward_output_dense": ROW,
    },
)

# PEFT's defaults for these models (peft's
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: q_proj, v_proj).
DEFAULT_TARGETS = ("query", "value")

# keras-hub's `LlamaTransformerDecoder`, `MistralTransformerDecoder` and
# `QwenTransformerDecoder` build their causal (Mistral: sliding-window) mask
# in `_compute_self_attention_mask`; the backbones list them in
# `transformer_layers`.
DECODER_STACK = DecoderStack()
