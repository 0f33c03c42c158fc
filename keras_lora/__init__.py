"""keras-lora: LoRA fine-tuning for Keras 3 on TensorFlow, JAX and PyTorch."""

from keras_lora.adapter_format import read_adapter_config
from keras_lora.callbacks import GPUMemoryCallback
from keras_lora.checkpoint import AdapterCheckpoint
from keras_lora.chunked_loss import ChunkedCausalLM, chunked_causal_lm
from keras_lora.distribution import distribute_lora
from keras_lora.embedding import LoraEmbedding
from keras_lora.families.gpt2 import gpt2_layout_map
from keras_lora.injection import (
    freeze_non_lora,
    inject_lora,
    lora_layers,
    print_trainable_parameters,
    trainable_summary,
    wrap_layers,
)
from keras_lora.interop import export_hf_model, export_peft, import_peft
from keras_lora.layer import LoraLayer
from keras_lora.lora_plus import LoraPlusOptimizer, lora_plus_optimizer
from keras_lora.merge import merge_lora
from keras_lora.quantized import initialize_quantized, quantized_dtype_policy
from keras_lora.remat import remat_layers
from keras_lora.saving import load_adapter, save_adapter
from keras_lora.switching import (
    active_adapters,
    adapter_batch,
    adapter_names,
    delete_adapter,
    disable_lora,
    set_adapter,
)
from keras_lora.targeting import layer_paths, target_layers
from keras_lora.version import __version__ as __version__
from keras_lora.weighted import add_weighted_adapter

__all__ = [
    "AdapterCheckpoint",
    "ChunkedCausalLM",
    "GPUMemoryCallback",
    "LoraEmbedding",
    "LoraLayer",
    "LoraPlusOptimizer",
    "active_adapters",
    "adapter_batch",
    "add_weighted_adapter",
    "adapter_names",
    "chunked_causal_lm",
    "delete_adapter",
    "disable_lora",
    "distribute_lora",
    "export_hf_model",
    "export_peft",
    "freeze_non_lora",
    "gpt2_layout_map",
    "import_peft",
    "initialize_quantized",
    "inject_lora",
    "layer_paths",
    "load_adapter",
    "lora_layers",
    "lora_plus_optimizer",
    "merge_lora",
    "print_trainable_parameters",
    "quantized_dtype_policy",
    "read_adapter_config",
    "remat_layers",
    "save_adapter",
    "set_adapter",
    "target_layers",
    "trainable_summary",
    "wrap_layers",
]
