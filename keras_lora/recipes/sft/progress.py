"""Training progress of `keras-lora sft`: a bar on a terminal, else lines."""

from __future__ import annotations

import math
import sys
import time

import keras

from keras_lora.recipes.training import StepLog

__all__ = ["LINES", "Progress"]

# Lines a run prints when its output is not a terminal (a log file, CI).
LINES = 10


class Progress(keras.callbacks.Callback):
    """Step, loss and speed during `fit`, after `StepLog` in the callbacks.

    On a terminal, Keras's progress bar (`keras.utils.Progbar`) with each
    step's loss; otherwise one line every `ceil(total / LINES)` steps and
    at the last: `step 40/200  loss 2.3456  0.52 s/step`.

    Args:
        total: the run's steps.
        first_step: steps done before this `fit` (a resumed run's).
        log: the `StepLog` of the same `fit`, which gives each step's loss.
        stream: where to write; by default `sys.stdout`.

    Example:

    >>> import io
    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> log, out = StepLog(), io.StringIO()
    >>> x, y = np.zeros((4, 2)), np.ones((4, 1))
    >>> _ = model.fit(x, y, batch_size=2, verbose=0,
    ...               callbacks=[log, Progress(2, 0, log, out)])
    >>> [line.split("  ")[:2] for line in out.getvalue().splitlines()][0]
    ['step 1/2', 'loss 1.0000']
    >>> len(out.getvalue().splitlines())
    2
    """

    def __init__(self, total: int, first_step: int, log: StepLog, stream=None):
        super().__init__()
        self.total = total
        self.first_step = first_step
        self.log = log
        self.stream = sys.stdout if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.bar = None
        if isatty is not None and isatty():
            self.bar = keras.utils.Progbar(total, stateful_metrics=["loss"])
            if first_step:
                self.bar.update(first_step)
        self.every = max(1, math.ceil(total / LINES))
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        step = self.first_step + batch + 1
        loss = self.log.losses[-1]
        if self.bar is not None:
            self.bar.update(step, values=[("loss", loss)])
        elif step % self.every == 0 or step == self.total:
            done = step - self.first_step
            rate = (time.perf_counter() - self._start) / done
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} s/step",
                file=self.stream,
                flush=True,
            )
