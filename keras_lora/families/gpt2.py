"""keras-hub GPT-2 (`GPT2Backbone`) and transformers' `GPT2LMHeadModel`.

transformers fuses query|key|value into one Conv1D, `attn.c_attn`, whose
3 * hidden outputs are the query, key and value columns, each ordered
(heads, head_dim) exactly as keras-hub's (hidden, heads, head_dim) kernels
flatten. Conv1D stores weights as (in, out): `fan_in_fan_out`.
"""

from keras_lora.families.family import Family, Projection

GPT2 = Family(
    name="gpt2",
    backbone_class="GPT2Backbone",
    block="transformer_layer_{block}",
    projections=(
        Projection("query", "self_attention/query", "attn.c_attn"),
        Projection("key", "self_attention/key", "attn.c_attn"),
        Projection("value", "self_attention/value", "attn.c_attn"),
        Projection(
            "attention_output", "self_attention/attention_output", "attn.c_proj"
        ),
        Projection(
            "feedforward_intermediate_dense",
            "feedforward_intermediate_dense",
            "mlp.c_fc",
        ),
        Projection(
            "feedforward_output_dense", "feedforward_output_dense", "mlp.c_proj"
        ),
    ),
    default_targets=("query", "value"),
    hf_block="h.{block}",
    hf_model_prefixes={"GPT2LMHeadModel": "transformer.", "GPT2Model": ""},
    fan_in_fan_out=True,
)
