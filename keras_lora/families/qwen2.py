"""keras-hub Qwen (`QwenBackbone`, keras-hub's Qwen2 converter
`convert_qwen.py`) and transformers' `Qwen2ForCausalLM`.

Layers, weight maps and layouts: `keras_lora.families.decoder`. Qwen2's
query, key and value projections have biases (the others do not); LoRA
leaves them as they are.
"""

from keras_lora.families import decoder
from keras_lora.families.family import Family

QWEN2 = Family(
    name="qwen2",
    backbone_class="QwenBackbone",
    block="transformer_layer_{block}",
    projections=decoder.projections(qkv_bias=True),
    default_targets=decoder.DEFAULT_TARGETS,
    hf_block="layers.{block}",
    hf_model_prefixes={"Qwen2ForCausalLM": "model.", "Qwen2Model": ""},
    title="Qwen2",
    hf_class_prefix="Qwen2",
    hf_task_types={"Qwen2ForCausalLM": "CAUSAL_LM"},
    sharding=decoder.SHARDING,
    decoder_stack=decoder.DECODER_STACK,
)
