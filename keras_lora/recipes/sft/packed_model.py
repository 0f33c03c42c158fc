"""The packed forward: a causal LM whose rows hold several examples.

keras-hub backbones take a padding mask only, so a block-diagonal mask
cannot reach their attention through the backbone's own graph. This module
builds a second functional model over the same layers, driven by the
family's `DecoderStack` (`keras_lora.families.family`): it runs the
backbone's token embedding, calls each transformer layer with a
(batch, query, key) attention mask that is 1 only where query and key
belong to the same example (keras-hub's Llama, Mistral and Qwen2 decoder
layers accept it as `decoder_attention_mask` and combine it with their
causal mask), the final layer norm, and the embedding's reverse (the output
head, tied or not). No padding mask is passed: padding is segment 0, so a
padded position attends to padding only, and no example ever sees it.

The layers are shared with the causal LM, LoRA wrappers included: fitting
the packed model trains the causal LM's adapter.

Rotary-position families need no position restart: their attention scores
see only relative positions, so an example placed at any offset of a row
computes what it computes alone. Families with learned absolute positions
(GPT-2), or whose layers take no attention mask (Gemma, Gemma 3), are
refused with the family's `packing_refusal`.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_lora.families import family_of

__all__ = ["packed_causal_lm"]


def packed_causal_lm(lm: keras.Model) -> keras.Model:
    """A model over `lm`'s layers taking packed rows.

    Args:
        lm: a keras-hub causal LM of a family with a `decoder_stack`.

    Returns:
        A functional model from `{"token_ids", "segment_ids"}` (each
        (batch, length) int32; segment 0 is padding, 1, 2, ... the row's
        examples) to logits (batch, length, vocabulary).

    Raises:
        ValueError: for a family that cannot pack, saying why.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(
    ...     vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4,
    ...     intermediate_dim=8, max_sequence_length=8)
    >>> packed_causal_lm(keras_hub.models.GPT2CausalLM(backbone))
    Traceback (most recent call last):
    ...
    ValueError: --packing is not supported for GPT-2: GPT-2 adds learned ...
    """
    family = family_of(lm)
    stack = family.decoder_stack
    if stack is None:
        raise ValueError(
            f"--packing is not supported for {family.label}: {family.packing_refusal}"
        )
    backbone = lm.backbone
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    same = ops.equal(ops.expand_dims(segment_ids, 2), ops.expand_dims(segment_ids, 1))
    block_mask = ops.cast(same, "int32")
    embedding = getattr(backbone, stack.embedding)
    x = embedding(token_ids)
    for layer in getattr(backbone, stack.layers):
        x = layer(x, **{stack.attention_mask_argument: block_mask})
    x = getattr(backbone, stack.final_norm)(x)
    logits = embedding(x, reverse=True)
    return keras.Model(
        {"token_ids": token_ids, "segment_ids": segment_ids},
        logits,
        name=f"{lm.name}_packed",
    )
