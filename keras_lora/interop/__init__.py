"""Exchange with other LoRA formats: Hugging Face PEFT adapter directories.

`peft_format` is the file format; `peft` maps it onto keras-hub models
through their family data (`keras_lora.families`).
"""

from keras_lora.interop.peft import export_peft, import_peft

__all__ = ["export_peft", "import_peft"]
