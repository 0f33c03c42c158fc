"""Build a keras-hub model of a family with quantized kernels from the start.

`model.quantize("int8")` quantizes a model that was built in float: for a
moment the float model exists whole, and on a small machine that moment
sets the memory high-water mark. `quantized_dtype(family, mode)` is a dtype
policy that makes each of the family's projections (and the token
embedding, the tied output head) build its int8/int4 variables directly;
`keras_lora.quantized.initialize_quantized` then fills them layer by layer.
Which layers those are is the family's data: its block path and projection
paths, plus keras-hub's `token_embedding` (the backbone's
`token_embedding` attribute in every keras-hub family).
"""

from __future__ import annotations

import re

import keras

from keras_lora.families.family import Family
from keras_lora.quantized import quantized_dtype_policy

# keras-hub names the token embedding layer of every backbone this way
# (`Backbone.token_embedding`).
TOKEN_EMBEDDING = "token_embedding"


def projection_paths(family: Family) -> list[str]:
    """Regular expressions of the paths of every block's projections in a
    backbone of `family`.

    >>> from keras_lora.families import GPT2
    >>> projection_paths(GPT2)[0]
    'transformer_layer_\\\\d+/self_attention/query'
    """
    head, _, tail = family.block.partition("{block}")
    block = re.escape(head) + r"\d+" + re.escape(tail)
    return [f"{block}/{re.escape(p.path)}" for p in family.projections]


def quantized_paths(family: Family) -> list[str]:
    """Regular expressions of the layer paths `model.quantize` would
    quantize in a backbone of `family`: every block's projections and the
    token embedding.

    >>> from keras_lora.families import GPT2
    >>> quantized_paths(GPT2)[0]
    'transformer_layer_\\\\d+/self_attention/query'
    """
    return projection_paths(family) + [TOKEN_EMBEDDING]


def quantized_dtype(
    family: Family, mode: str, source: str = "float32"
) -> keras.dtype_policies.DTypePolicyMap:
    """The `dtype` that builds a backbone of `family` with `mode` kernels.

    Args:
        family: e.g. `keras_lora.families.GPT2`.
        mode: "int8" or "int4".
        source: the float policy of everything else (norms, biases, the
            LoRA path).

    Returns:
        A `DTypePolicyMap` to pass as the backbone's `dtype`.

    Raises:
        ValueError: for a mode other than int8/int4.

    Example (random weights; pretrained weights are not loaded this way):

    ```python
    backbone = keras_hub.models.GPT2Backbone(
        **config, dtype=quantized_dtype(GPT2, "int8")
    )
    keras_lora.initialize_quantized(backbone)  # one layer's float at a time
    ```
    """
    return quantized_dtype_policy(mode, quantized_paths(family), source=source)
