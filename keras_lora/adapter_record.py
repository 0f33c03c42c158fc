"""`Adapter`: one adapter of a `LoraLayer`, the single source of its facts.

A record holds the adapter's settings (`keras_lora.settings.LoraSettings`:
rank, alpha, scale, ...), its factors, its dropout layer and its variant
pieces, objects it calls rather than flags its callers test:

- `variant`: how its update enters the layer's output: `LORA` (added) or
  a `keras_lora.dora.Dora` (DoRA's magnitude rescales the output);
- `initial`: what the wrapped kernel lacks from the original one:
  `ORIGINAL_KERNEL` (nothing), or a
  `keras_lora.initialization.ResidualKernel` (PiSSA/OLoRA's frozen initial
  factors).

`keras_lora.adapter_state.new_adapter` is the one factory of records;
`LoraLayer`'s `rank`, `alpha`, `scale`, `lora_a`, `lora_b`, ... read its
first record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from keras_lora.initialization import ORIGINAL_KERNEL
from keras_lora.low_rank import delta
from keras_lora.settings import LoraSettings, SettingsAttributes


class Lora:
    """The LoRA variant: the update `scale * B(A(dropout(x)))` adds to the
    wrapped layer's output; merging adds `scale * A·B` into the kernel."""

    magnitude = None
    variables: tuple = ()
    # Its path can run fused with other adapters' (one pass, gated).
    fusable = True

    def update(self, layer, adapter: Adapter, inputs, base, training=None):
        """What `adapter` adds to the layer's output (`base` unused)."""
        return layer.lora_update(inputs, training=training, adapter=adapter)

    def kernel_update(self, layer, adapter: Adapter, kernel):
        """What `adapter` adds to the float32 `kernel` when merged."""
        return delta(layer.split, adapter)


LORA = Lora()


@dataclasses.dataclass(eq=False)
class Adapter(SettingsAttributes):
    """One adapter's settings, factors and variant pieces in a `LoraLayer`.

    Args:
        name: the adapter's name.
        settings: its `LoraSettings`.
        lora_a: A, float32, shaped `split.in_shape + (rank,)`.
        lora_b: B, float32, shaped `(rank,) + split.out_shape`.
        dropout_layer: the dropout on its path's input, or None.
        variant: `LORA` or a `keras_lora.dora.Dora`.
        initial: `ORIGINAL_KERNEL` or a
            `keras_lora.initialization.ResidualKernel`.
    """

    name: str
    settings: LoraSettings
    lora_a: keras.Variable
    lora_b: keras.Variable
    dropout_layer: keras.layers.Layer | None = None
    variant: Any = LORA
    initial: Any = ORIGINAL_KERNEL

    @property
    def rewrites_kernel(self) -> bool:
        """Whether the wrapped kernel is a residual (PiSSA/OLoRA): such an
        adapter must be its layer's only one."""
        return self.settings.rewrites_kernel

    @property
    def magnitude(self) -> keras.Variable | None:
        """DoRA's magnitude, or None."""
        return self.variant.magnitude

    @property
    def variables(self) -> tuple:
        """The trainable variables: the factors (and DoRA's magnitude)."""
        return (self.lora_a, self.lora_b) + self.variant.variables

    def update(self, layer, inputs, base, training=None):
        """What this adapter adds to `base`, the wrapped layer's output."""
        return self.variant.update(layer, self, inputs, base, training)

    def kernel_update(self, layer, kernel):
        """What this adapter adds to the float32 `kernel` when merged."""
        return self.variant.kernel_update(layer, self, kernel)

    def factors_for_original_kernel(self) -> tuple:
        """(A, B, rank, alpha) as numpy: this adapter as LoRA over the
        ORIGINAL kernel (what adapter files and PEFT export hold)."""
        return self.initial.factors_for_original_kernel(self)
