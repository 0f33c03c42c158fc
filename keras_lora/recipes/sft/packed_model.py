"""The packed forward: a causal LM whose rows hold several examples.

keras-hub backbones take a padding mask only, so a block-diagonal mask
cannot reach their attention through the backbone's inputs. The packed
model runs the causal LM's own graph (embedding scale, norms, soft caps,
output head: whatever the family's graph does) with every transformer
layer's attention mask narrowed to the block-diagonal one: a query attends
to a key only if both belong to the same example. Where the mask reaches
each layer is family data (`Family.decoder_stack`: the layers and the
method that builds their mask), applied by one door function,
`keras_lora._keras_internals.hub.narrowed_attention_masks`. Padding is segment
0, so a padded position attends to padding only, and no example ever sees
it; the padding mask passed to the graph is all ones.

The layers are the causal LM's, LoRA wrappers included: fitting the packed
model trains the causal LM's adapter.

Rotary-position families need no position restart: their attention scores
see only relative positions, so an example placed at any offset of a row
computes what it computes alone. Families with learned absolute positions
(GPT-2) are refused with the family's `packing_refusal`.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_lora._keras_internals.hub import narrowed_attention_masks
from keras_lora.families import family_of
from keras_lora.families.family import DecoderStack

__all__ = ["PackedCausalLM", "packed_causal_lm"]


class PackedCausalLM(keras.Model):
    """A keras-hub causal LM over packed rows.

    Args:
        lm: the keras-hub causal LM whose graph and layers it runs.
        decoder_stack: where the block-diagonal mask reaches `lm`'s layers.

    Call arguments:
        inputs: `{"token_ids", "segment_ids"}`, each (batch, length) int32;
            segment 0 is padding, 1, 2, ... the row's examples.

    Returns:
        Logits (batch, length, vocabulary).
    """

    def __init__(self, lm: keras.Model, decoder_stack: DecoderStack, **kwargs):
        super().__init__(**kwargs)
        self.lm = lm
        self.decoder_stack = decoder_stack

    def call(self, inputs, training=False):
        token_ids = inputs["token_ids"]
        segment_ids = inputs["segment_ids"]
        same_example = ops.equal(
            ops.expand_dims(segment_ids, 2), ops.expand_dims(segment_ids, 1)
        )
        layers = getattr(self.lm.backbone, self.decoder_stack.layers)
        method = self.decoder_stack.attention_mask_method
        with narrowed_attention_masks(layers, method, same_example):
            return self.lm(
                {"token_ids": token_ids, "padding_mask": ops.ones_like(token_ids)},
                training=training,
            )


def packed_causal_lm(lm: keras.Model) -> PackedCausalLM:
    """A model over `lm`'s graph and layers taking packed rows.

    Args:
        lm: a keras-hub causal LM of a family with a `decoder_stack`.

    Returns:
        A `PackedCausalLM` from `{"token_ids", "segment_ids"}` to logits.

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
    return PackedCausalLM(lm, stack, name=f"{lm.name}_packed")
