"""keras-hub Gemma 3 (`Gemma3Backbone`, text) and transformers'
`Gemma3ForCausalLM`.

The blocks are Gemma's (`keras_lora.families.gemma`): the same layers,
head-major kernels, transformers modules and layouts (Gemma 3 adds query
and key norms, which LoRA does not touch). Only the class names differ.
keras-hub's converter (`convert_gemma3.py`) reads `gemma3_text`
checkpoints; multimodal `Gemma3ForConditionalGeneration` adapters (keys
under `model.language_model.`) are not mapped here.
"""

import dataclasses

from keras_lora.families.gemma import GEMMA

GEMMA3 = dataclasses.replace(
    GEMMA,
    name="gemma3",
    backbone_class="Gemma3Backbone",
    hf_model_prefixes={"Gemma3ForCausalLM": "model.", "Gemma3TextModel": ""},
    title="Gemma 3",
    hf_class_prefix="Gemma3",
    hf_task_types={"Gemma3ForCausalLM": "CAUSAL_LM"},
    hf_export_requires={},
)
