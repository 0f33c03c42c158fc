"""How a Dense or EinsumDense kernel splits into the LoRA factors A and B.

LoRA treats a kernel as one matrix from every input feature the layer
contracts to every output feature it produces (the paper, PEFT and Flax's
`LoRALinearGeneral` all do). For an EinsumDense equation `in,kernel->out`
each kernel axis is either *contracted* (in the input, not in the output) or
an *output feature* (in the output, not in the input). A takes the
contracted axes to the rank and B takes the rank to the output axes, both in
kernel order:

    GPT-2 query   abc,cde->abde  kernel (768, 12, 64)  A (768, r)     B (r, 12, 64)
    attn output   abcd,cde->abe  kernel (12, 64, 768)  A (12, 64, r)  B (r, 768)
    Gemma query   btd,ndh->btnh  kernel (8, 2048, 256) A (2048, r)    B (r, 8, 256)

At call time the input is transposed so the contracted axes come last and
flattened to (tokens, fan_in): the LoRA path is then two plain matmuls,
which every backend runs at full speed (ellipsis einsums did not).
"""

from __future__ import annotations

import dataclasses
import math
import string

import keras

# Letters for the axes an ellipsis stands for; EinsumDense equations use
# lowercase letters, and any letter already used is skipped.
_ELLIPSIS_LETTERS = string.ascii_uppercase + string.ascii_lowercase


@dataclasses.dataclass(frozen=True)
class KernelSplit:
    """The LoRA factorisation of one kernel.

    Attributes:
        input_spec: input subscripts of the equation (may hold `...`).
        output_spec: output subscripts of the equation (may hold `...`).
        kernel_spec: kernel subscripts of the equation.
        in_axes: contracted kernel subscripts, in kernel order.
        out_axes: output-feature kernel subscripts, in kernel order.
        in_shape: sizes of `in_axes`; A has shape `in_shape + (rank,)`.
        out_shape: sizes of `out_axes`; B has shape `(rank,) + out_shape`.
    """

    input_spec: str
    output_spec: str
    kernel_spec: str
    in_axes: str
    out_axes: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)

    def delta_equation(self) -> str:
        """Einsum equation `A, B -> kernel-shaped update`."""
        rank_letter = _free_letter(self.kernel_spec)
        return (
            f"{self.in_axes}{rank_letter},{rank_letter}{self.out_axes}"
            f"->{self.kernel_spec}"
        )

    def call_plan(self, ndim: int) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
        """Static plan to apply the factors to an input of rank `ndim`.

        Returns `(input_perm, num_batch_axes, output_perm)`: transpose the
        input by `input_perm`, flatten its first `num_batch_axes` axes into
        tokens and the rest into features, multiply by A then B, unflatten,
        and transpose by `output_perm` (empty tuples mean "already in
        order").
        """
        used = self.input_spec + self.kernel_spec + self.output_spec
        input_spec, output_spec = _expand_ellipsis(
            self.input_spec, self.output_spec, ndim, used
        )
        batch_axes = [c for c in input_spec if c not in self.in_axes]
        input_order = batch_axes + list(self.in_axes)
        input_perm = tuple(input_spec.index(c) for c in input_order)
        result_spec = "".join(batch_axes) + self.out_axes
        output_perm = tuple(result_spec.index(c) for c in output_spec)
        return (
            () if input_perm == tuple(range(ndim)) else input_perm,
            len(batch_axes),
            () if output_perm == tuple(range(len(output_perm))) else output_perm,
        )


def split_kernel(layer: keras.layers.Layer) -> KernelSplit:
    """Return the LoRA split of a built `Dense` or `EinsumDense` kernel.

    Args:
        layer: a built `keras.layers.Dense` or `keras.layers.EinsumDense`.

    Returns:
        Its `KernelSplit`.

    Raises:
        ValueError: if the layer's equation has a kernel axis that is both
            in the input and the output (or in neither), so the kernel is
            not one input-to-output matrix.

    Example:

    >>> query = keras.layers.EinsumDense("abc,cde->abde", (None, 12, 64))
    >>> query.build((None, None, 768))
    >>> split = split_kernel(query)
    >>> split.in_shape, split.out_shape, split.delta_equation()
    ((768,), (12, 64), 'cA,Ade->cde')
    """
    kernel_shape = tuple(int(d) for d in layer.kernel.shape)
    if isinstance(layer, keras.layers.EinsumDense):
        equation = layer.equation.replace(" ", "")
    else:
        # A Dense layer is the EinsumDense `...a,ab->...b`.
        equation = "...a,ab->...b"
    input_spec, kernel_spec, output_spec = _parse(equation, layer.name)
    in_axes, out_axes = "", ""
    for axis in kernel_spec:
        in_input, in_output = axis in input_spec, axis in output_spec
        if in_input and not in_output:
            in_axes += axis
        elif in_output and not in_input:
            out_axes += axis
        else:
            where = "both the input and the output" if in_input else "neither"
            raise ValueError(
                f"Layer '{layer.name}' has equation '{equation}': kernel axis "
                f"'{axis}' appears in {where}, so its kernel is not one "
                "matrix from input features to output features and LoRA "
                "cannot factor it. Leave this layer out of `targets`."
            )
    if not in_axes or not out_axes:
        raise ValueError(
            f"Layer '{layer.name}' has equation '{equation}' with no "
            f"{'contracted' if not in_axes else 'output'} kernel axis; LoRA "
            "needs both. Leave this layer out of `targets`."
        )
    for axis in input_spec.replace("...", ""):
        if axis not in kernel_spec and axis not in output_spec:
            raise ValueError(
                f"Layer '{layer.name}' has equation '{equation}': input axis "
                f"'{axis}' is summed without the kernel, which LoRA does not "
                "support. Leave this layer out of `targets`."
            )
    size = dict(zip(kernel_spec, kernel_shape, strict=True))
    return KernelSplit(
        input_spec=input_spec,
        output_spec=output_spec,
        kernel_spec=kernel_spec,
        in_axes=in_axes,
        out_axes=out_axes,
        in_shape=tuple(size[a] for a in in_axes),
        out_shape=tuple(size[a] for a in out_axes),
    )


def _parse(equation: str, name: str) -> tuple[str, str, str]:
    try:
        inputs, output_spec = equation.split("->")
        input_spec, kernel_spec = inputs.split(",")
    except ValueError:
        raise ValueError(
            f"Layer '{name}' has equation '{equation}', which is not of the "
            "form 'input,kernel->output'."
        ) from None
    if "..." in kernel_spec:
        raise ValueError(
            f"Layer '{name}' has equation '{equation}' with an ellipsis in "
            "the kernel subscripts; LoRA needs every kernel axis named."
        )
    return input_spec, kernel_spec, output_spec


def _free_letter(used: str) -> str:
    return next(c for c in _ELLIPSIS_LETTERS if c not in used)


def _expand_ellipsis(
    input_spec: str, output_spec: str, ndim: int, used: str
) -> tuple[str, str]:
    if "..." not in input_spec:
        if len(input_spec) != ndim:
            raise ValueError(
                f"Expected an input of rank {len(input_spec)} for subscripts "
                f"'{input_spec}', got rank {ndim}."
            )
        return input_spec, output_spec
    count = ndim - (len(input_spec) - 3)
    letters = "".join(c for c in _ELLIPSIS_LETTERS if c not in used)[:count]
    return input_spec.replace("...", letters), output_spec.replace("...", letters)
