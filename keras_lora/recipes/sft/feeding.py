"""Batches of several shapes through one `model.fit`, and what they cost.

`fit` takes one array per input, so one shape, and keras-hub's
`CausalLM.fit` converts arrays to `tf.data` anyway (it takes only
`tf.data` or grain datasets beside arrays, no `PyDataset`). Batches of
several lengths (length buckets, packed rows) therefore reach `fit` as
`tf.data.Dataset.from_generator` with the batch and length axes left open,
on every backend: JAX receives each batch as NumPy and traces and compiles
one step function per new shape; TensorFlow's `tf.function`
(`reduce_retracing`) traces a step function that takes any length;
PyTorch runs eagerly. (A `PyDataset` on TensorFlow would fix its shapes
from its first two batches, and a later, longer batch would fail.)
Without TensorFlow installed, a plain Keras model gets a
`keras.utils.PyDataset` instead.

`StepTraces` counts the traces for real: it wraps the model's
`train_step`, whose Python body runs once per trace on JAX and TensorFlow
(and once per step on PyTorch, where nothing is traced).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_lora.recipes.sft.buckets import Step, StepBatches

__all__ = ["StepSequence", "StepTraces", "fit_data", "throughput"]


class StepSequence(keras.utils.PyDataset):
    """A `PyDataset` of prepared step batches, one per index.

    Args:
        steps: `(x, y, sample_weight)` per step.

    Example:

    >>> import numpy as np
    >>> step = ({"token_ids": np.zeros((1, 8), "int32")}, np.zeros((1, 8)), None)
    >>> len(StepSequence([step, step]))
    2
    """

    def __init__(self, steps: list[Step]):
        super().__init__()
        self.batches = steps

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Step:
        return self.batches[index]


def fit_data(batches: StepBatches):
    """What `model.fit` takes for `batches` (one epoch, in step order).

    Args:
        batches: the step batches.

    Returns:
        A `tf.data.Dataset` with open batch and length axes; a
        `StepSequence` when TensorFlow is not installed.
    """
    try:
        import tensorflow as tf
    except ImportError:
        return StepSequence(batches.steps)

    x, y, weight = batches.steps[0]

    def spec(array: np.ndarray):
        return tf.TensorSpec((None, None), tf.as_dtype(array.dtype))

    signature = ({k: spec(v) for k, v in x.items()}, spec(y), spec(weight))
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(batches.steps), output_signature=signature
    )
    # A known length: Keras's TensorFlow trainer, run to the end of a
    # dataset of unknown length, counts one optimizer step too many
    # (`optimizer.iterations`, which checkpoints are named after).
    return dataset.apply(tf.data.experimental.assert_cardinality(len(batches.steps)))


class StepTraces:
    """Counts the executions of `model.train_step`'s Python body.

    On JAX and TensorFlow the body runs once per traced step function; on
    PyTorch once per step (nothing is traced).

    Args:
        model: the model `fit` will train; its `train_step` is wrapped.

    Attributes:
        shapes: the `token_ids` shape seen at each execution (`None` for
            an axis a trace leaves open).

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> traces = StepTraces(model)
    >>> traces.count
    0
    """

    def __init__(self, model: keras.Model):
        self.shapes: list[tuple] = []
        step = model.train_step

        def counted(*args):
            # JAX passes (state, data), the others (data).
            x = args[-1][0]
            tokens = x["token_ids"] if isinstance(x, dict) else x
            self.shapes.append(tuple(tokens.shape))
            return step(*args)

        model.train_step = counted

    @property
    def count(self) -> int:
        """Executions so far."""
        return len(self.shapes)

    @property
    def traced(self) -> int | None:
        """Step functions traced: None on PyTorch, which traces none."""
        return None if keras.backend.backend() == "torch" else self.count


def throughput(
    batches: StepBatches, step_times: list[float]
) -> tuple[float | None, float | None]:
    """(real tokens per second, compile seconds) of a run.

    The first step of each input shape includes tracing and compiling; the
    other steps are steady. Tokens per second counts real (non-padding)
    tokens over the steady steps; the compile time is what the first steps
    of each shape took beyond the steady time per position.

    Args:
        batches: the step batches `fit` ran, in order.
        step_times: wall seconds per step (`StepLog.step_times`).

    Returns:
        Both None when no step is steady.

    Example:

    >>> from keras_lora.recipes.sft.encode import Encoded
    >>> from keras_lora.recipes.sft.buckets import bucketed_steps
    >>> b = bucketed_steps([Encoded([5, 6, 7], [-100, 6, 7], line=1)], 1, 3, 0, 0, 64)
    >>> throughput(b, [2.0, 0.5, 0.5])
    (6.0, 1.5)
    """
    seen: set[tuple] = set()
    first_time = first_positions = steady_time = steady_positions = 0.0
    steady_tokens = 0
    for (x, _, _), tokens, seconds in zip(
        batches.steps, batches.real_tokens, step_times, strict=True
    ):
        shape = tuple(x["token_ids"].shape)
        positions = float(np.prod(shape))
        if shape in seen:
            steady_time += seconds
            steady_positions += positions
            steady_tokens += tokens
        else:
            seen.add(shape)
            first_time += seconds
            first_positions += positions
    if steady_time <= 0:
        return None, None
    compile_s = first_time - first_positions * steady_time / steady_positions
    return steady_tokens / steady_time, max(compile_s, 0.0)
