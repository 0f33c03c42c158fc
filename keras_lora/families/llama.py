"""keras-hub Llama (`LlamaBackbone`, and `Llama3Backbone` from keras-hub's
Llama 3 converter) and transformers' `LlamaForCausalLM`.

Layers, weight maps and layouts: `keras_lora.families.decoder`.
"""

from keras_lora.families import decoder
from keras_lora.families.family import Family

LLAMA = Family(
    name="llama",
    backbone_class="LlamaBackbone",
    block="transformer_layer_{block}",
    projections=decoder.projections(),
    default_targets=decoder.DEFAULT_TARGETS,
    hf_block="layers.{block}",
    hf_model_prefixes={"LlamaForCausalLM": "model.", "LlamaModel": ""},
    title="Llama",
    hf_class_prefix="Llama",
    hf_task_types={"LlamaForCausalLM": "CAUSAL_LM"},
    # The token embedding; the LM head is tied to it only in tied configs.
    hf_embedding="embed_tokens",
    hf_output_heads={"LlamaForCausalLM": "lm_head"},
    sharding=decoder.SHARDING,
    decoder_stack=decoder.DECODER_STACK,
)
