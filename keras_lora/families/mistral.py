"""keras-hub Mistral (`MistralBackbone`) and transformers'
`MistralForCausalLM`.

Layers, weight maps and layouts: `keras_lora.families.decoder`. keras-hub's
converter (`convert_mistral.py`) rounds every weight to float16 on the way
in, so a converted model differs from the transformers one by that rounding.
"""

from keras_lora.families import decoder
from keras_lora.families.family import Family

MISTRAL = Family(
    name="mistral",
    backbone_class="MistralBackbone",
    block="transformer_layer_{block}",
    projections=decoder.projections(),
    default_targets=decoder.DEFAULT_TARGETS,
    hf_block="layers.{block}",
    hf_model_prefixes={"MistralForCausalLM": "model.", "MistralModel": ""},
    title="Mistral",
    hf_class_prefix="Mistral",
    hf_task_types={"MistralForCausalLM": "CAUSAL_LM"},
    sharding=decoder.SHARDING,
    decoder_stack=decoder.DECODER_STACK,
)
