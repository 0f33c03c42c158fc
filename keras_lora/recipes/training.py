"""What every training recipe shares: the optimizer, the step log, the plot.

`optimizer_and_loss` is the keras.io GPT-2 LoRA example's AdamW and
cross-entropy (`TokenCrossEntropy`); `StepLog` records each step's loss and
time during `fit`; `plot_losses` draws the losses. `finetune`, the notebook and the
benchmark's worker use these, so their numbers mean the same thing.
"""

from __future__ import annotations

import time

import keras
from keras import ops

DECAY_EXCLUDED = ("bias", "gamma", "beta")


def optimizer_and_loss(learning_rate: float, exclude_from_decay: bool = True):
    """AdamW and cross-entropy exactly as in the keras.io GPT-2 LoRA example.

    Args:
        learning_rate: AdamW's learning rate.
        exclude_from_decay: keep biases and layer-norm weights out of weight
            decay, as the example does. Pass False when the only trainable
            weight is a bias: Keras's torch AdamW cannot decay an empty list
            (RuntimeError in `torch._foreach_mul_`).

    Returns:
        `(optimizer, loss)`.

    Example:

    >>> optimizer, loss = optimizer_and_loss(5e-5)
    >>> type(optimizer).__name__, float(optimizer.weight_decay)
    ('AdamW', 0.01)
    """
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=0.01,
        epsilon=1e-6,
        global_clipnorm=1.0,
    )
    if exclude_from_decay:
        optimizer.exclude_from_weight_decay(var_names=list(DECAY_EXCLUDED))
    return optimizer, TokenCrossEntropy()


@keras.saving.register_keras_serializable(package="keras_lora")
class TokenCrossEntropy(keras.losses.Loss):
    """Next-token cross-entropy from logits, over (tokens, vocabulary) rows.

    The same values as `keras.losses.SparseCategoricalCrossentropy(
    from_logits=True)` (per token, then Keras's reduction and sample
    weights), computed on the logits flattened to 2-D. Why: Keras's torch
    backend moves the class axis of 3-D logits to position 1 for
    `torch.nn.functional.cross_entropy`, so the log-softmax runs over a
    strided axis and copies the (batch, sequence, vocabulary) logits;
    flattened, it reads the vocabulary in memory order. Measured on GPT-2
    base (50,257-way output, batch 8 x 128, 2-core CPU): the loss alone
    0.57 -> 0.22 s forward and backward on torch, a whole frozen-model
    step 5.06 -> 4.88 s (README, "Speed"); JAX and TensorFlow unchanged.

    Example:

    >>> import numpy as np
    >>> logits = np.log(np.array([[[0.25, 0.75], [0.5, 0.5]]], "float32"))
    >>> labels = np.array([[1, 0]])
    >>> loss = TokenCrossEntropy()(labels, logits)
    >>> round(float(loss), 4)  # mean of -log 0.75 and -log 0.5
    0.4904
    """

    def __init__(self, name="token_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        vocabulary = ops.shape(y_pred)[-1]
        per_token = ops.sparse_categorical_crossentropy(
            ops.reshape(y_true, (-1,)),
            ops.reshape(y_pred, (-1, vocabulary)),
            from_logits=True,
        )
        return ops.reshape(per_token, ops.shape(y_true))


class StepLog(keras.callbacks.Callback):
    """Loss, wall time and CPU time of each train step during `fit`.

    Keras logs the mean loss of the epoch so far. With
    `steps_per_execution=k` it calls the batch hooks once per execution of
    k steps, passing the index of the execution's last step; this callback
    turns the running means back into each execution's own mean loss
    (exact for equal-sized batches). One entry per hook call: per step when
    `steps_per_execution` is 1, per execution otherwise, with `steps`
    saying how many steps each entry covers.

    Defining `on_train_batch_end` turns off Keras's asynchronous callback
    dispatch, and reading the logged loss waits for the step's device work,
    so each interval covers the whole step.

    Attributes:
        losses: mean loss of each entry's steps.
        running_means: the epoch's running mean as Keras logged it.
        steps: train steps per entry.
        step_times: wall seconds per entry.
        cpu_times: process CPU seconds (all threads) per entry.

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> log = StepLog()
    >>> x, y = np.ones((8, 2)), np.zeros((8, 1))
    >>> _ = model.fit(x, y, batch_size=2, callbacks=[log], verbose=0)
    >>> log.steps, len(log.losses)
    ([1, 1, 1, 1], 4)
    """

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []
        self.running_means: list[float] = []
        self.steps: list[int] = []
        self.step_times: list[float] = []
        self.cpu_times: list[float] = []
        self._done = 0
        self._mean = 0.0
        self._start = self._cpu_start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._done, self._mean = 0, 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self.step_times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)
        # `batch` is the index of the last step run: batch + 1 steps of this
        # epoch are done, `steps` of them in this execution.
        done = batch + 1
        steps = max(1, done - self._done)
        self.losses.append((done * mean - self._done * self._mean) / steps)
        self.running_means.append(mean)
        self.steps.append(steps)
        self._done, self._mean = done, mean


def first_and_last(losses: list[float], most: int = 5):
    """The first and last losses to average, never overlapping (when 2+).

    Example:

    >>> first_and_last([4.0, 3.0, 2.0, 1.0], most=5)
    ([4.0, 3.0], [2.0, 1.0])
    """
    k = max(1, min(most, len(losses) // 2))
    return losses[:k], losses[-k:]


def plot_losses(losses: list[float], path: str, title: str) -> str | None:
    """Loss per step and its running mean as a PNG.

    Args:
        losses: one loss per step.
        path: the PNG to write.
        title: the chart's title.

    Returns:
        `path`, or None when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        print("(no training_loss.png: pip install matplotlib to get one)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = range(1, len(losses) + 1)
    running = [sum(losses[:k]) / k for k in steps]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, marker=".", label="loss of the step")
    ax.plot(steps, running, label="running mean")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
