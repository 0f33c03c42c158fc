"""Keep a model's traced inference steps across adapter switches.

Keras caches the steps it traced (`predict_function`, keras-hub's
`generate_function`); tracing (and XLA compiling) them again costs seconds.
Switching adapters changes variables' values, which traced steps read
afresh, but two things still differ from what a step was traced with:

- The call mode ("uniform": every row the same adapters, or a mixed
  batch, `keras_lora.adapter_state`) is Python state baked into a trace.
  `switch_mode` keeps each mode's steps aside and puts them back when the
  model returns to that mode.
- Trainable flags (`set_adapter` makes only the active adapters
  trainable). TensorFlow and torch steps do not care, but a JAX step gets
  the variables' values as two lists, trainable then non-trainable, and
  maps them back to variables by their position at trace time: a step
  called with other flags would read one variable's value as another's, and
  JAX does not trace again when the shapes line up. `pin_trainable` wraps a
  JAX step so that it is always called in its trace-time layout.

Training steps are never kept: the optimizer follows the trainable flags.
"""

from __future__ import annotations

import contextlib

import keras

KEPT = ("predict_function", "generate_function")
DROPPED = ("train_function", "test_function")


def switch_mode(model: keras.layers.Layer, leaving, entering) -> None:
    """Keep `model`'s traced steps under `leaving`; restore `entering`'s.

    A change of the model's variables (or of how it compiles) since the
    steps were kept forgets them all.
    """
    stash = _stash(model)
    fingerprint = _fingerprint(model)
    if stash.get(None) != fingerprint:
        stash.clear()
        stash[None] = fingerprint
    stash[leaving] = {n: getattr(model, n) for n in KEPT if hasattr(model, n)}
    restored = stash.pop(entering, {})
    for name in KEPT:
        if hasattr(model, name):
            setattr(model, name, restored.get(name))
    drop_training_steps(model)


def forget(model: keras.layers.Layer, which=None) -> None:
    """Forget the steps kept aside (after the model's variables changed):
    all, or those of the modes for which `which(mode)` is true."""
    stash = _stash(model)
    if which is None:
        stash.clear()
        return
    for mode in [m for m in stash if m is not None and which(m)]:
        del stash[mode]


def drop_training_steps(model: keras.layers.Layer) -> None:
    for name in DROPPED:
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def pin_trainable(model: keras.layers.Layer, trainable_before: list) -> None:
    """On JAX, make the traced steps (the ones in use and the kept ones)
    run with the trainable variables `trainable_before`, their trace-time
    layout, whatever the flags are now. Other backends: nothing to do."""
    if keras.backend.backend() != "jax":
        return
    pinned = list(trainable_before)
    steps = [(model.__dict__, n) for n in KEPT]
    for key, kept in _stash(model).items():
        if key is not None:
            steps.extend((kept, n) for n in KEPT)
    for owner, name in steps:
        step = owner.get(name)
        if step is None or getattr(step, "_keras_lora_pinned", False):
            continue  # Untraced, or pinned to its own trace-time layout.
        if name == "predict_function":
            owner[name] = _pinned_predict(model, step, pinned)
        else:
            owner[name] = _pinned_generate(model, step, pinned)


def _pinned_predict(model, step, pinned):
    """Keras's JAX `predict_function(state, iterator)` with `state` (the
    trainable and non-trainable values in today's layout) reordered into
    the trace-time layout, and the returned state ordered back."""
    pinned_ids = {id(v) for v in pinned}

    def predict_function(state, iterator):
        now = model.trainable_variables + model.non_trainable_variables
        values = list(state[0]) + list(state[1])
        values = dict(zip(map(id, now), values, strict=True))
        then_non = [v for v in model.variables if id(v) not in pinned_ids]
        inner = (
            [values[id(v)] for v in pinned],
            [values[id(v)] for v in then_non],
        )
        with _trainable_flags(model, pinned_ids):  # A new shape traces anew.
            outputs, (trainable, non_trainable) = step(inner, iterator)
        back = list(trainable) + list(non_trainable)
        back = dict(zip(map(id, pinned + then_non), back, strict=True))
        return outputs, (
            [back[id(v)] for v in model.trainable_variables],
            [back[id(v)] for v in model.non_trainable_variables],
        )

    predict_function._keras_lora_pinned = True
    return predict_function


def _pinned_generate(model, step, pinned):
    """keras-hub's JAX `generate_function`, which reads the trainable
    variables itself: called with the trace-time flags."""
    pinned_ids = {id(v) for v in pinned}

    def generate_function(inputs, stop_token_ids=None):
        with _trainable_flags(model, pinned_ids):
            return step(inputs, stop_token_ids=stop_token_ids)

    generate_function._keras_lora_pinned = True
    return generate_function


@contextlib.contextmanager
def _trainable_flags(model, trainable_ids):
    """The trace-time trainable flags for the call, today's after it."""
    flags = [(v, v.trainable) for v in model.variables]
    for v, _ in flags:
        v.trainable = id(v) in trainable_ids
    try:
        yield
    finally:
        for v, flag in flags:
            v.trainable = flag


def _stash(model) -> dict:
    stash = model.__dict__.get("_keras_lora_traces")
    if stash is None:
        stash = {}
        # Not a tracked attribute (nor, on torch, a module attribute).
        object.__setattr__(model, "_keras_lora_traces", stash)
    return stash


def _fingerprint(model) -> tuple:
    # A mixed batch's rows variables come and go with its size; only the
    # mixed steps read them (see `keras_lora.switching.adapter_batch`).
    kept = [v for v in model.variables if not v.path.endswith("/adapter_rows")]
    return (
        tuple(id(v) for v in kept),
        getattr(model, "jit_compile", None),
        getattr(model, "run_eagerly", None),
        id(getattr(model, "sampler", None)),
    )
