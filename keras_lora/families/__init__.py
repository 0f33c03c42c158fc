"""keras-hub model families as data (see `family.py`); one module each."""

from keras_lora.families.family import Family, KernelAxes, Projection, Sharding
from keras_lora.families.gemma import GEMMA
from keras_lora.families.gemma3 import GEMMA3
from keras_lora.families.gpt2 import GPT2, gpt2_layout_map
from keras_lora.families.layout import layout_map
from keras_lora.families.llama import LLAMA
from keras_lora.families.mistral import MISTRAL
from keras_lora.families.quantized_build import (
    projection_paths,
    quantized_dtype,
    quantized_paths,
)
from keras_lora.families.qwen2 import QWEN2

FAMILIES = (GPT2, LLAMA, MISTRAL, QWEN2, GEMMA, GEMMA3)

__all__ = [
    "FAMILIES",
    "GEMMA",
    "GEMMA3",
    "GPT2",
    "LLAMA",
    "MISTRAL",
    "QWEN2",
    "Family",
    "KernelAxes",
    "Projection",
    "Sharding",
    "family_of",
    "family_of_class",
    "hf_family",
    "gpt2_layout_map",
    "layout_map",
    "projection_paths",
    "quantized_dtype",
    "quantized_paths",
]


def family_of(model) -> Family:
    """The family of a keras-hub backbone or task model (its `.backbone`).

    Args:
        model: a keras-hub backbone, or a task model with a `.backbone`.

    Returns:
        The `Family` whose `backbone_class` the backbone is (or subclasses).

    Raises:
        ValueError: for a model of no known family, naming the known ones.
    """
    backbone = getattr(model, "backbone", model)
    family = family_of_class(type(backbone))
    if family is not None:
        return family
    known = ", ".join(f"{f.name} ({f.backbone_class})" for f in FAMILIES)
    raise ValueError(
        f"{type(model).__name__} is not a keras-hub model of a known family; "
        f"known: {known}."
    )


def family_of_class(backbone_class: type) -> Family | None:
    """The family whose `backbone_class` a keras-hub backbone class is (or
    subclasses), or None.

    >>> import keras_hub
    >>> family_of_class(keras_hub.models.Llama3Backbone).name
    'llama'
    """
    names = {c.__name__ for c in backbone_class.__mro__}
    for family in FAMILIES:
        if family.backbone_class in names:
            return family
    return None


def hf_family(architectures: list[str] | None) -> Family | None:
    """The family of a Hugging Face config's `architectures`, or None.

    Args:
        architectures: the config's class names ("LlamaForCausalLM").

    >>> hf_family(["Qwen2ForCausalLM"]).name
    'qwen2'
    """
    for name in architectures or []:
        for family in FAMILIES:
            if name in family.hf_model_prefixes or name in family.hf_task_types:
                return family
    return None
