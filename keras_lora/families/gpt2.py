"""keras-hub GPT-2 (`GPT2Backbone`) and transformers' `GPT2LMHeadModel`.

transformers fuses query|key|value into one Conv1D, `attn.c_attn`, whose
3 * hidden outputs are the query, key and value columns, each ordered
(heads, head_dim) exactly as keras-hub's (hidden, heads, head_dim) kernels
flatten. Conv1D stores weights as (in, out): `fan_in_fan_out`.

Variable paths of keras-hub GPT-2 (base sizes; "..." = transformer_layer_i),
which `sharding` lays out (see `gpt2_layout_map`):

    token_embedding/embeddings                      (50257, 768)  tied LM head
    position_embedding/embeddings                   (1024, 768)
    .../self_attention/{query,key,value}/kernel     (768, 12, 64)
    .../self_attention/{query,key,value}/lora_a     (768, r)
    .../self_attention/{query,key,value}/lora_b     (r, 12, 64)
    .../self_attention/attention_output/kernel      (12, 64, 768)
    .../self_attention/attention_output/lora_a      (12, 64, r)
    .../self_attention/attention_output/lora_b      (r, 768)
    .../feedforward_intermediate_dense/kernel       (768, 3072)
    .../feedforward_intermediate_dense/lora_{a,b}   (768, r), (r, 3072)
    .../feedforward_output_dense/kernel             (3072, 768)
    .../feedforward_output_dense/lora_{a,b}         (3072, r), (r, 768)

plus biases and layer norms, which stay replicated.
"""

from __future__ import annotations

import keras

from keras_lora.families.family import (
    COLUMN,
    DENSE,
    HEADS_COLUMN,
    HEADS_IN,
    HEADS_OUT,
    HEADS_ROW,
    HIDDEN,
    ROW,
    Family,
    Projection,
    Sharding,
)
from keras_lora.families.layout import layout_map

GPT2 = Family(
    name="gpt2",
    backbone_class="GPT2Backbone",
    block="transformer_layer_{block}",
    projections=(
        Projection("query", "self_attention/query", "attn.c_attn", HEADS_OUT, True),
        Projection("key", "self_attention/key", "attn.c_attn", HEADS_OUT, True),
        Projection("value", "self_attention/value", "attn.c_attn", HEADS_OUT, True),
        Projection(
            "attention_output",
            "self_attention/attention_output",
            "attn.c_proj",
            HEADS_IN,
            True,
        ),
        Projection(
            "feedforward_intermediate_dense",
            "feedforward_intermediate_dense",
            "mlp.c_fc",
            DENSE,
            True,
        ),
        Projection(
            "feedforward_output_dense",
            "feedforward_output_dense",
            "mlp.c_proj",
            DENSE,
            True,
        ),
    ),
    default_targets=("query", "value"),
    hf_block="h.{block}",
    hf_model_prefixes={"GPT2LMHeadModel": "transformer.", "GPT2Model": ""},
    fan_in_fan_out=True,
    title="GPT-2",
    hf_class_prefix="GPT2",
    hf_task_types={"GPT2LMHeadModel": "CAUSAL_LM"},
    # The token embedding (tied to the LM head on both sides).
    hf_embedding="wte",
    hf_output_heads={"GPT2LMHeadModel": "lm_head"},
    packing_refusal=(
        "GPT-2 adds learned absolute position embeddings: a packed example "
        "would see positions that do not start at 0 and compute something "
        "other than it computes alone; train GPT-2 without --packing "
        "(length buckets already cut most padding)"
    ),
    sharding=Sharding(
        embeddings={
            "token_embedding/embeddings": (None, HIDDEN),
            "position_embedding/embeddings": (None, HIDDEN),
        },
        projections={
            "query": HEADS_COLUMN,
            "key": HEADS_COLUMN,
            "value": HEADS_COLUMN,
            "attention_output": HEADS_ROW,
            "feedforward_intermediate_dense": COLUMN,
            "feedforward_output_dense": ROW,
        },
    ),
)


def gpt2_layout_map(
    device_mesh: keras.distribution.DeviceMesh,
    batch_dim_name: str = "batch",
    model_dim_name: str = "model",
    shard_embeddings: bool = True,
) -> keras.distribution.LayoutMap:
    """A `keras.distribution.LayoutMap` for keras-hub GPT-2 with LoRA.

    For `keras.distribution.ModelParallel` (JAX backend). The kernels are
    sharded on the model axis Megatron-style, and replicated over the batch
    axis (each batch shard holds a full model replica):

    | variable | shape (GPT-2 base) | layout |
    | --- | --- | --- |
    | query/key/value kernel | (768, 12, 64) | (None, model, None): heads |
    | attention_output kernel | (12, 64, 768) | (model, None, None): heads |
    | feedforward_intermediate kernel | (768, 3072) | (None, model) |
    | feedforward_output kernel | (3072, 768) | (model, None) |
    | token / position embeddings | (50257 / 1024, 768) | (None, model) |
    | biases, layer norms | | replicated |

    The column-parallel layers (query/key/value, feed-forward intermediate)
    produce head- or feature-sharded activations that the row-parallel
    layers (attention output, feed-forward output) consume without
    resharding; a block then needs one all-reduce per row-parallel layer
    (forward, and again backward).
    The embeddings are sharded on their hidden axis, not the vocabulary:
    JAX shards an axis only into equal parts, and GPT-2's 50257 tokens
    (29 x 1733) divide by no usual mesh size.

    LoRA factors get explicit layouts too; the rank axis is never sharded.
    With `shard_embeddings=True` every factor is sharded on the model axis
    along its large (feature) axis: query A (768, r) as (model, None), query
    B (r, 12, 64) as (None, model, None), attention-output A (12, 64, r) as
    (model, None, None), B (r, 768) as (None, model), and likewise for the
    feed-forward factors. With `shard_embeddings=False` the factors follow
    their kernel instead: the factor on the kernel's sharded axis is
    sharded like it (query B, attention-output A, intermediate B, output
    A), the other one is replicated.

    Measured (2 blocks of GPT-2 base width, vocabulary 50257, rank 8, LoRA
    on all six projections, mesh (2, 4), 4 x 128 tokens per replica;
    collectives counted in the compiled training step):

    | embeddings | LoRA factors | collectives | MB a step |
    | --- | --- | --- | --- |
    | sharded | sharded along the large axis (default) | 44 | 124.30 |
    | sharded | following their kernel | 56 | 124.58 |
    | sharded | replicated | 68 | 125.14 |
    | replicated | following their kernel (`shard_embeddings=False`) | 9 | 14.11 |
    | replicated | replicated | 21 | 14.67 |
    | replicated | sharded along the large axis | 44 | 124.30 |

    With sharded embeddings GSPMD keeps the activations sharded on the
    hidden axis, and a factor that is not sharded on that axis costs extra
    all-gathers of its gradient; with replicated embeddings, sharding A on
    the hidden axis drags the activations to hidden sharding. Chosen to
    match, the LoRA factors cost almost nothing (9 collectives are the
    Megatron all-reduces, with the LoRA partial products fused into them);
    the embeddings decide the rest. Sharded, the tied LM head ends in an
    all-reduce of the logits (tokens x 50257 floats: 103 MB of the 124 MB);
    replicated, every model shard computes the whole LM head (a third of
    GPT-2 base's parameters) and holds the whole embedding (154 MB for
    GPT-2 base). On 8 virtual CPU devices sharing 2 cores (compute-bound,
    no real interconnect) a step took 2.5 s with sharded and 5.2 s with
    replicated embeddings; on accelerators with a slow interconnect,
    `shard_embeddings=False` may win.

    The model axis size must divide the number of heads, the hidden and the
    intermediate size (GPT-2 base: 12 heads, so 1, 2, 3, 4, 6 or 12).

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` whose axis names
            include `batch_dim_name` and `model_dim_name` (other axes are
            allowed; weights are replicated over them).
        batch_dim_name: the mesh axis the data is split over; pass the same
            name to `ModelParallel(batch_dim_name=...)`.
        model_dim_name: the mesh axis the weights are sharded over.
        shard_embeddings: shard the token and position embeddings on their
            hidden axis (default), or replicate them; the LoRA factors'
            layouts follow this choice (see above).

    Returns:
        A `keras.distribution.LayoutMap`; each GPT-2 variable path matches
        at most one of its keys.

    Raises:
        ValueError: if `device_mesh` is not a `DeviceMesh`, lacks one of the
            two axis names, or the two names are the same.

    Example (the device names are only recorded; no device is touched):

    >>> mesh = keras.distribution.DeviceMesh(
    ...     (2, 4), ("batch", "model"), [f"cpu:{i}" for i in range(8)])
    >>> layouts = gpt2_layout_map(mesh)
    >>> layouts["transformer_layer_0/self_attention/query/kernel"].axes
    (None, 'model', None)
    >>> layouts["transformer_layer_0/self_attention/query/lora_a"].axes
    ('model', None)

    On JAX, with 8 accelerators, build, inject, compile and fit inside the
    distribution's scope:

        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
        distribution = keras.distribution.ModelParallel(
            layout_map=gpt2_layout_map(mesh), batch_dim_name="batch")
        with distribution.scope():
            lm = keras_hub.models.GPT2CausalLM.from_preset(
                "gpt2_base_en", preprocessor=None)
            inject_lora(lm, rank=4, targets=("query", "value"))
    """
    return layout_map(
        GPT2, device_mesh, batch_dim_name, model_dim_name, shard_embeddings
    )
