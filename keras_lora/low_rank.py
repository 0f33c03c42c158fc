"""The LoRA path: adapters' factors applied to an input, and their update.

One function, `project`, runs every LoRA path of a `LoraLayer` (one
adapter's fast path, the gated adapters, a mixed batch, PiSSA/OLoRA's
initial factors, DoRA's low-rank term): transpose the input so the
contracted axes come last, flatten it to (tokens, fan_in), and multiply by
A then B, two plain matmuls (ellipsis einsums ran 1.9x slower on JAX).
"""

from __future__ import annotations

from collections.abc import Sequence

from keras import ops


def project(layer, inputs, factors: Sequence, columns):
    """`B(A(inputs))` with each rank column multiplied by `columns`.

    Args:
        layer: the `LoraLayer` (its `split`, `compute_dtype` and `name`).
        inputs: the layer's input (any dropout already applied).
        factors: adapter records (`lora_a`, `lora_b`, `rank`); several are
            concatenated along the rank, in order.
        columns: what each rank column is multiplied by between the two
            matmuls: a number (one adapter's scale), a `(rank,)` tensor,
            or `(batch, rank)` (a mixed batch: per row).

    Returns:
        The update, shaped like the layer's output, in its compute dtype.
    """
    split = layer.split
    dtype = layer.compute_dtype
    per_row = len(getattr(columns, "shape", ())) == 2
    x = inputs
    input_perm, num_batch_axes, output_perm = split.call_plan(len(x.shape))
    if input_perm:
        x = ops.transpose(x, input_perm)
    batch_shape = tuple(ops.shape(x)[:num_batch_axes])
    if per_row:
        rows, batch = columns.shape[0], x.shape[0]
        if batch is not None and rows is not None and batch != rows:
            raise ValueError(
                f"adapter_batch was given {rows} adapter names, but layer "
                f"'{layer.name}' got a batch of {batch} rows. Pass one name "
                "(or None) per row."
            )
        x = ops.reshape(x, (batch_shape[0], -1, split.fan_in))
        columns = ops.expand_dims(columns, 1)  # (batch, 1, rank): per row.
    else:
        x = ops.reshape(x, (-1, split.fan_in))
    # The factors are float32; the path runs in the compute dtype. Under a
    # mixed policy Keras's autocast already casts them (this is a no-op),
    # but under a full half-precision policy the compute and variable
    # dtypes match, Keras does not autocast, and float32 factors would
    # silently run the path in float32.
    lora_a = [
        ops.reshape(ops.cast(f.lora_a, dtype), (split.fan_in, f.rank)) for f in factors
    ]
    lora_b = [
        ops.reshape(ops.cast(f.lora_b, dtype), (f.rank, split.fan_out)) for f in factors
    ]
    if len(factors) > 1:
        lora_a = [ops.concatenate(lora_a, axis=1)]
        lora_b = [ops.concatenate(lora_b, axis=0)]
    # Weight the (tokens, rank) product: the smallest tensor on the path.
    x = ops.matmul(ops.matmul(x, lora_a[0]) * columns, lora_b[0])
    x = ops.reshape(x, batch_shape + split.out_shape)
    if output_perm:
        x = ops.transpose(x, output_perm)
    return x


def delta(split, factors):
    """`scale * A·B` in float32, shaped like the kernel `split` describes.

    Args:
        split: the layer's `KernelSplit`.
        factors: an adapter record (`lora_a`, `lora_b`, `scale`).
    """
    update = ops.einsum(
        split.delta_equation(),
        ops.convert_to_tensor(factors.lora_a.value, "float32"),
        ops.convert_to_tensor(factors.lora_b.value, "float32"),
    )
    return update * factors.scale
