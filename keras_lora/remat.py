"""Rematerialise whole layers (e.g. transformer blocks) of a built model.

Training keeps every intermediate activation of every block for the
backward pass; for GPT-2 base at batch 8 x 128 that is ~1.4 GB, far more
than the weights LoRA leaves frozen. Checkpointing each block keeps only
its input and recomputes the block's internals in the backward pass, one
block at a time. `keras.RematScope(mode="full")` would do this, but Keras
3.15 passes every call argument through the backend's checkpoint, and
keras-hub's blocks take Python flags (`use_causal_mask=True`), which
JAX cannot trace ("boolean conversion of a tracer"). `remat_layers`
checkpoints only the tensor arguments and closes over the rest.

On TensorFlow and PyTorch it uses `keras.remat`. On JAX it uses its own
custom VJP (`_recompute_jax`): under `jax.checkpoint` XLA's CPU compiler
moves the recomputation back into the forward pass and nothing is saved.
The VJP also keeps XLA from holding two things of every block at once:
the dropout masks' random counters (computed up front otherwise) and the
gradient passed down (recomputed by fusion in every consumer otherwise).
"""

from __future__ import annotations

import keras

from keras_lora import _keras_internals

_FLAG = "_keras_lora_remat"


def _seed_states(layer) -> list:
    """The seed-generator state variables of `layer` and its sublayers."""
    return [
        v
        for v in layer.non_trainable_variables
        if "seed_generator" in v.path and v.dtype in ("uint32", "int32")
    ]


def _is_tensor(value) -> bool:
    return value is not None and hasattr(value, "shape") and hasattr(value, "dtype")


def remat_layers(layers) -> int:
    """Recompute each layer's forward pass in the backward pass.

    Only the layer's tensor inputs are kept for the backward pass; other
    arguments (flags, `None`) are passed unchanged. Gradients are the same
    as without (on TensorFlow `tf.recompute_grad` draws a new dropout mask
    in the recomputation; use dropout 0 there for identical gradients).
    Inference (`predict`, `generate`) is unchanged. Calling it again on a
    layer does nothing.

    Args:
        layers: built Keras layers (e.g. a backbone's transformer blocks).

    Returns:
        The number of layers newly wrapped.

    Raises:
        ValueError: if a layer is not built.
    """
    layers = list(layers)
    for layer in layers:
        if not layer.built:
            raise ValueError(
                f"Layer '{layer.name}' is not built: build the model (call it "
                "once or build it) before remat_layers."
            )
    count = 0
    for layer in layers:
        if getattr(layer, _FLAG, False):
            continue
        _wrap(layer)
        count += 1
    return count


def _wrap(layer) -> None:
    call = layer.call
    recompute = _recompute_jax if keras.backend.backend() == "jax" else _recompute

    def remat_call(*args, **kwargs):
        flat = keras.tree.flatten((args, kwargs))
        if any(isinstance(t, keras.KerasTensor) for t in flat):
            return call(*args, **kwargs)  # Symbolic: nothing to keep.
        positions = [i for i, value in enumerate(flat) if _is_tensor(value)]
        seeds = _seed_states(layer)

        def run(*tensors):
            values = list(flat)
            for i, tensor in zip(positions, tensors, strict=True):
                values[i] = tensor
            a, k = keras.tree.pack_sequence_as((args, kwargs), values)
            return call(*a, **k)

        # Dropout advances its seed state inside the block: the new state
        # is returned and assigned here, outside the checkpoint, and the
        # recomputation reads the same old state, drawing the same masks.
        outputs, states = recompute(layer, seeds, run, [flat[i] for i in positions])
        for variable, state in zip(seeds, states, strict=True):
            variable.assign(state)
        return outputs

    # An instance attribute: Keras's `__call__` looks up `self.call`.
    object.__setattr__(layer, "call", remat_call)
    object.__setattr__(layer, _FLAG, True)


def _recompute(layer, seeds, run, tensors):
    """`run(*tensors)` under `keras.remat` (TensorFlow, PyTorch), and the
    seed states it leaves."""

    def run_and_seeds(*tensors):
        return run(*tensors), [v.value for v in seeds]

    return keras.remat(run_and_seeds)(*tensors)


def _recompute_jax(layer, seeds, run, tensors):
    """`run(*tensors)` and the seed states it leaves, keeping only the
    layer's inputs and variables for the backward pass, which recomputes the
    rest once the output's cotangent exists.

    Not `jax.checkpoint`: XLA's CPU compiler removes its optimization
    barriers before scheduling (pass `cse_barrier_expander`), and the
    scheduler then runs every block's recomputation during the forward pass,
    so all activations are live at the loss again (GPT-2 base widths: XLA's
    temporaries grew 0.09 GB per block with it, 0.10 without). A custom VJP
    whose recomputation reads its inputs through `_after(cotangents)` cannot
    be moved before the cotangent arrives.
    """
    import jax

    scope = _keras_internals.current_stateless_scope()
    if scope is None:
        # Eager: no backward pass to save memory for.
        return run(*tensors), [v.value for v in seeds]
    variables = layer.variables
    values = []
    for variable in variables:
        value = scope.get_current_value(variable)
        values.append(
            _keras_internals.stored_value(variable) if value is None else value
        )

    seed_ids = {id(v) for v in seeds}
    seed_positions = [i for i, v in enumerate(variables) if id(v) in seed_ids]

    def forward(values, tensors):
        # The dropout masks' random counters depend on the seed states
        # alone, so XLA's scheduler computed every block's at the start of
        # the step and kept them all (GPT-2 base: 0.31 GB, the step's peak).
        # Read through `_after(tensors)`, a block's seeds exist once its
        # input does.
        values = list(values)
        tied = _after([values[i] for i in seed_positions], tensors)
        for i, value in zip(seed_positions, tied, strict=True):
            values[i] = value
        # The layer reads its variables from `values` (traced), and its seed
        # states' updates are returned, to be assigned outside.
        with keras.StatelessScope(
            state_mapping=list(zip(variables, values, strict=True))
        ) as s:
            outputs = run(*tensors)
            return outputs, [s.get_current_value(v) for v in seeds]

    @jax.custom_vjp
    def block(values, tensors):
        return forward(values, tensors)

    def block_forward(values, tensors):
        return forward(values, tensors), (values, tensors)

    def block_backward(saved, cotangents):
        _, pullback = jax.vjp(forward, *_after(saved, cotangents))
        values_cotangents, inputs_cotangents = pullback(cotangents)
        # XLA's CPU fusion recomputed the gradient passed down (a sum over
        # the residual stream) inside each of its consumers, keeping pieces
        # of every block alive until the first block's backward pass (GPT-2
        # base: 9 MB per block); as a buffer of its own, they die here.
        return values_cotangents, _materialized(inputs_cotangents)

    block.defvjp(block_forward, block_backward)
    return block(values, list(tensors))


def _after(saved, cotangents):
    """`saved` plus an exact zero computed from `cotangents`: the same
    values, which XLA can only compute once the cotangents exist.

    `g * 0` is not folded for floats (inf * 0 is nan) and `where(isfinite)`
    keeps the zero exact, so the values are bit-identical. Integers get it
    too: the dropout seed states, whose random bits XLA would otherwise
    share between the forward pass and the recomputation, keeping every
    block's masks alive (GPT-2 base widths: 26 MB per block).

    The zero is a sum over the whole cotangent, not a scalar picked from
    it: XLA fuses a cheap scalar expression into every consumer, one copy
    per fusion, and the compiled step, resident while it is in use, took
    0.49 GB of host memory (GPT-2 base, int8, chunked loss; 0.11 GB
    without remat). A reduction is computed once per block: 0.16 GB.
    """
    import jax
    import jax.numpy as jnp

    zero = _zero(cotangents)
    if zero is None:
        return saved

    def tie(x):
        numeric = _is_float(x) or jnp.issubdtype(x.dtype, jnp.integer)
        return x + zero.astype(x.dtype) if numeric else x

    return jax.tree.map(tie, saved)


def _is_float(x) -> bool:
    import jax.numpy as jnp

    return jnp.issubdtype(x.dtype, jnp.floating)


def _zero(cotangents):
    """An exact zero that XLA can only compute from all of `cotangents`'
    floats (see `_after`); None when there are none."""
    import jax
    import jax.numpy as jnp

    floats = [c for c in jax.tree.leaves(cotangents) if _is_float(c)]
    if not floats:
        return None
    return sum(jnp.sum(jnp.where(jnp.isfinite(c), c * 0, 0)) for c in floats)


def _materialized(values):
    """`values`, unchanged, as buffers of their own.

    A conditional's operands are buffers that no fusion reaches into, and
    XLA cannot fold this one: its predicate compares `_after`'s exact zero,
    computed from the values themselves, with zero (always true).
    """
    import jax
    import jax.numpy as jnp

    zero = _zero(values)
    if zero is None:
        return values
    return jax.lax.cond(
        zero == 0,
        lambda v: v,
        lambda v: jax.tree.map(jnp.zeros_like, v),
        values,
    )
