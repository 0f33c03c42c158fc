"""Exchange with other LoRA formats: Hugging Face PEFT adapter directories.

`peft_format` is the file format; `peft_modules` maps it onto keras-hub
models through their family data (`keras_lora.families`), `peft_export` and
`peft_import` write and read adapters with that map, with `hf_layout`
turning each family's kernel-axes data into PEFT's (out, in) matrices;
`hf_model` saves merged models as Hugging Face model directories.
"""

from keras_lora.interop.hf_model import export_hf_model
from keras_lora.interop.peft_export import export_peft
from keras_lora.interop.peft_import import import_peft

__all__ = ["export_hf_model", "export_peft", "import_peft"]
