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
"""

from __future__ import annotations

import keras

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
    as without (on PyTorch a recomputed dropout draws a new mask; use
    dropout 0 there for identical gradients). Calling it again on a layer
    does nothing.

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
            outputs = call(*a, **k)
            # Dropout advances its seed state inside the block: return the
            # new state so it is assigned outside the checkpoint (JAX
            # refuses a value traced inside it escaping through a
            # variable), and the recomputation reads the same old state,
            # drawing the same masks.
            return outputs, [v.value for v in seeds]

        outputs, states = keras.remat(run)(*(flat[i] for i in positions))
        for variable, state in zip(seeds, states, strict=True):
            variable.assign(state)
        return outputs

    # An instance attribute: Keras's `__call__` looks up `self.call`.
    object.__setattr__(layer, "call", remat_call)
    object.__setattr__(layer, _FLAG, True)
