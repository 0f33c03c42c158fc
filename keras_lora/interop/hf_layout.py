"""Keras kernels and LoRA factors <-> Hugging Face (out, in) matrices.

One mechanism for every family: a projection's `KernelAxes`
(`keras_lora.families.family`) names its kernel's axes and lists the ones
Hugging Face flattens into its output and input features, major first. With
the layer's `KernelSplit` (which kernel axes are contracted, and their
sizes) that fixes two permutations, and everything else is a transpose and
a reshape:

    Keras A (in axes..., r)   -> PEFT lora_A (r, fan_in)
    Keras B (r, out axes...)  -> PEFT lora_B (fan_out, r)
    Keras kernel              -> Hugging Face weight (fan_out, fan_in)

Grouped-query attention needs nothing special (the sizes come from the
layer), and a head-major kernel such as Gemma's (heads, hidden, head_dim)
is only another axis order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_lora.families.family import KernelAxes
from keras_lora.kernel_split import KernelSplit


@dataclasses.dataclass(frozen=True)
class HfLayout:
    """How one layer's factors and kernel become Hugging Face matrices.

    Attributes:
        split: the layer's LoRA split.
        in_perm: Hugging Face's input axes, as positions in `split.in_axes`.
        out_perm: its output axes, as positions in `split.out_axes`.
        kernel_perm: the kernel axes in Hugging Face (out..., in...) order.
    """

    split: KernelSplit
    in_perm: tuple[int, ...]
    out_perm: tuple[int, ...]
    kernel_perm: tuple[int, ...]

    @property
    def fan_in(self) -> int:
        return self.split.fan_in

    @property
    def fan_out(self) -> int:
        return self.split.fan_out

    def a_to_hf(self, a: np.ndarray) -> np.ndarray:
        """Keras A, shaped `in_shape + (r,)` -> PEFT lora_A (r, fan_in)."""
        rank = a.shape[-1]
        a = np.transpose(a, self.in_perm + (len(self.in_perm),))
        return a.reshape(self.fan_in, rank).T

    def b_to_hf(self, b: np.ndarray) -> np.ndarray:
        """Keras B, shaped `(r,) + out_shape` -> PEFT lora_B (fan_out, r)."""
        rank = b.shape[0]
        b = np.transpose(b, (0,) + tuple(1 + p for p in self.out_perm))
        return b.reshape(rank, self.fan_out).T

    def a_from_hf(self, lora_a: np.ndarray) -> np.ndarray:
        """PEFT lora_A (r, fan_in) -> Keras A, shaped `in_shape + (r,)`."""
        rank = lora_a.shape[0]
        shape = tuple(self.split.in_shape[p] for p in self.in_perm) + (rank,)
        a = lora_a.T.reshape(shape)
        return np.transpose(a, tuple(np.argsort(self.in_perm + (len(shape) - 1,))))

    def b_from_hf(self, lora_b: np.ndarray) -> np.ndarray:
        """PEFT lora_B (fan_out, r) -> Keras B, shaped `(r,) + out_shape`."""
        rank = lora_b.shape[1]
        shape = (rank,) + tuple(self.split.out_shape[p] for p in self.out_perm)
        b = lora_b.T.reshape(shape)
        return np.transpose(
            b, tuple(np.argsort((0,) + tuple(1 + p for p in self.out_perm)))
        )

    def kernel_to_hf(self, kernel: np.ndarray) -> np.ndarray:
        """A Keras kernel (or a kernel-shaped update) -> (fan_out, fan_in)."""
        return np.transpose(kernel, self.kernel_perm).reshape(self.fan_out, self.fan_in)


def hf_layout(split: KernelSplit, axes: KernelAxes | None, where: str) -> HfLayout:
    """The `HfLayout` of a layer with `split`, described by `axes`.

    Args:
        split: the layer's `KernelSplit`.
        axes: its family's `KernelAxes`; `None`: Hugging Face flattens the
            contracted and the output axes in kernel order.
        where: the layer, for messages.

    Raises:
        ValueError: if `axes` does not fit the layer: another number of
            kernel axes, or other axes contracted than its equation says
            (a keras-hub version that lays the kernel out differently).

    >>> from keras_lora.families.family import HEAD_MAJOR_OUT
    >>> from keras_lora.kernel_split import KernelSplit
    >>> split = KernelSplit("btd", "btnh", "ndh", "d", "nh", (16,), (4, 8))
    >>> layout = hf_layout(split, HEAD_MAJOR_OUT, "query")
    >>> layout.kernel_perm  # (heads, hidden, head_dim) -> (heads, head_dim, hidden)
    (0, 2, 1)
    """
    spec = split.kernel_spec
    if axes is None:
        return HfLayout(
            split,
            tuple(range(len(split.in_axes))),
            tuple(range(len(split.out_axes))),
            tuple(spec.index(c) for c in split.out_axes + split.in_axes),
        )
    if len(axes.kernel) != len(spec) or sorted(axes.kernel) != sorted(
        axes.hf_in + axes.hf_out
    ):
        raise ValueError(
            f"Layer '{where}' has a kernel with {len(spec)} axes ('{spec}'), but "
            f"its family data describes {axes.kernel} with Hugging Face input "
            f"{axes.hf_in} and output {axes.hf_out}. The installed keras-hub "
            "lays this layer out differently from `keras_lora.families`."
        )
    name = dict(zip(spec, axes.kernel, strict=True))
    in_names = [name[c] for c in split.in_axes]
    out_names = [name[c] for c in split.out_axes]
    if sorted(in_names) != sorted(axes.hf_in) or sorted(out_names) != sorted(
        axes.hf_out
    ):
        raise ValueError(
            f"Layer '{where}' contracts kernel axes {tuple(in_names)} and "
            f"produces {tuple(out_names)}, but its family data says Hugging "
            f"Face's input features are {axes.hf_in} and output features "
            f"{axes.hf_out}. The installed keras-hub lays this layer out "
            "differently from `keras_lora.families`."
        )
    return HfLayout(
        split,
        tuple(in_names.index(n) for n in axes.hf_in),
        tuple(out_names.index(n) for n in axes.hf_out),
        tuple(axes.kernel.index(n) for n in axes.hf_out + axes.hf_in),
    )
