"""`AdapterCheckpoint`: save the adapter during `fit`, keeping the last few."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable

import keras

from keras_lora.adapter_state import check_adapter_name
from keras_lora.files import staging_directory
from keras_lora.saving import save_adapter
from keras_lora.switching import adapter_names

_STEP_DIR = re.compile(r"step-(\d{8})")


class AdapterCheckpoint(keras.callbacks.Callback):
    """Saves the LoRA adapter every N steps and/or at each epoch end.

    Each checkpoint is an adapter directory `directory/step-00000123`
    (`save_adapter` format, loadable with `load_adapter`), named after the
    number of optimizer steps taken so far (`model.optimizer.iterations`
    when `fit` begins plus the steps taken since, so a second `fit`
    continues the count). Only the newest `keep` are kept.

    With `steps_per_execution > 1` Keras runs several steps between
    callbacks; a checkpoint is then saved at the end of the first execution
    that reaches or passes each multiple of `every_n_steps`, and named
    after the step it was actually taken at.

    Args:
        directory: where the checkpoints go; created if missing.
        every_n_steps: save after every N training steps; `None` for never.
        save_at_epoch_end: also save when an epoch ends.
        keep: how many checkpoints to keep (the newest); `None` keeps all.
        adapter_name: which adapter each checkpoint saves (a checkpoint
            holds one); may be left out when the model holds one. Checked
            when training begins: a model holding several adapters needs
            it, and it must be one of them.
        on_save: called as `on_save(directory, model)` after the adapter is
            written, to add files of its own (a recipe's optimizer state)
            to the checkpoint before it appears under its final name.

    Example:

    >>> import os, tempfile
    >>> import numpy as np
    >>> from keras_lora import inject_lora
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    >>> _ = inject_lora(model, rank=1, targets="d")
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> checkpoint = AdapterCheckpoint(tempfile.mkdtemp(), every_n_steps=2, keep=2)
    >>> x, y = np.ones((8, 4)), np.ones((8, 2))
    >>> _ = model.fit(x, y, batch_size=2, callbacks=[checkpoint], verbose=0)
    >>> [os.path.basename(path) for path in checkpoint.checkpoints]
    ['step-00000002', 'step-00000004']

    `load_adapter(base_model, checkpoint.latest)` restores the newest.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        every_n_steps: int | None = None,
        save_at_epoch_end: bool = True,
        keep: int | None = 3,
        adapter_name: str | None = None,
        on_save: Callable[[str, keras.Model], None] | None = None,
    ):
        super().__init__()
        if adapter_name is not None:
            check_adapter_name(adapter_name)
        if every_n_steps is not None and (
            not isinstance(every_n_steps, int) or every_n_steps <= 0
        ):
            raise ValueError(
                "`every_n_steps` must be a positive integer or None. "
                f"Received: every_n_steps={every_n_steps!r}"
            )
        if keep is not None and (not isinstance(keep, int) or keep <= 0):
            raise ValueError(
                f"`keep` must be a positive integer or None. Received: keep={keep!r}"
            )
        if every_n_steps is None and not save_at_epoch_end:
            raise ValueError(
                "AdapterCheckpoint would never save: pass `every_n_steps` or "
                "leave `save_at_epoch_end=True`."
            )
        self.directory = os.fspath(directory)
        self.every_n_steps = every_n_steps
        self.save_at_epoch_end = save_at_epoch_end
        self.keep = keep
        self.adapter_name = adapter_name
        self.on_save = on_save
        self.steps = 0  # Optimizer steps taken, as of the last callback.
        self._epoch_start = 0  # `steps` when the epoch began.
        self._epoch_iterations = 0  # The optimizer's count then.
        self._in_epoch = 0  # Steps of this epoch Keras has reported.
        self._saved_at: int | None = None

    @property
    def checkpoints(self) -> list[str]:
        """Checkpoint directories on disk, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        names = sorted(n for n in os.listdir(self.directory) if _STEP_DIR.fullmatch(n))
        return [os.path.join(self.directory, n) for n in names]

    @property
    def latest(self) -> str | None:
        """The newest checkpoint directory, or None."""
        checkpoints = self.checkpoints
        return checkpoints[-1] if checkpoints else None

    def on_train_begin(self, logs=None):
        # Fail before training rather than at the first save, steps later.
        known = adapter_names(self.model)
        if not known:
            raise ValueError(
                f"AdapterCheckpoint: model '{self.model.name}' has no LoRA "
                "adapter to save. Call `inject_lora(model)` before `fit`."
            )
        if self.adapter_name is None and len(known) > 1:
            raise ValueError(
                f"AdapterCheckpoint: model '{self.model.name}' holds adapters "
                f"{known}; a checkpoint holds one. Pass "
                "`AdapterCheckpoint(..., adapter_name=...)`."
            )
        if self.adapter_name is not None and self.adapter_name not in known:
            raise ValueError(
                f"AdapterCheckpoint: model '{self.model.name}' has no adapter "
                f"{self.adapter_name!r}; its adapters are {known}."
            )
        self.steps = self._iterations(default=self.steps)

    def on_epoch_begin(self, epoch, logs=None):
        # The optimizer's step counter is read once an epoch and when a
        # save may be due: on JAX, reading model state forces a state sync,
        # which every step would slow training down.
        self._epoch_start = self.steps
        self._epoch_iterations = self._iterations(default=0)
        self._in_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last step index of the execution that just ran
        # (with `steps_per_execution > 1` this hook runs once per
        # execution); Keras reports a full execution even when the epoch's
        # last one is short, hence the clamp and the exact read below.
        steps_per_epoch = self.params.get("steps") if self.params else None
        in_epoch = int(batch) + 1
        if steps_per_epoch:
            in_epoch = min(in_epoch, int(steps_per_epoch))
        self._in_epoch = in_epoch
        previous, estimate = self.steps, self._epoch_start + in_epoch
        n = self.every_n_steps
        if n and estimate // n > previous // n:
            self.steps = self._epoch_start + self._steps_in_epoch()
            if self.steps // n > previous // n:
                self._save()
        else:
            self.steps = estimate

    def on_epoch_end(self, epoch, logs=None):
        self.steps = self._epoch_start + self._steps_in_epoch()
        if self.save_at_epoch_end and self._saved_at != self.steps:
            self._save()

    def _steps_in_epoch(self) -> int:
        """The optimizer steps of this epoch so far.

        The optimizer's count since the epoch began, but never more than
        the steps Keras reported: Keras's TensorFlow trainer adds one to
        `optimizer.iterations`, without a step, when it reaches the end of
        data of unknown length (a generator, a filtered `tf.data`).
        """
        done = self._iterations(default=None)
        if done is None:
            return self._in_epoch
        return min(self._in_epoch, done - self._epoch_iterations)

    def _iterations(self, default: int | None) -> int | None:
        """`model.optimizer.iterations`, or `default` without an optimizer."""
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        if iterations is None:
            return default
        return int(keras.ops.convert_to_numpy(iterations))

    def _save(self) -> None:
        self._saved_at = self.steps
        name = f"step-{self.steps:08d}"
        target = os.path.join(self.directory, name)
        os.makedirs(self.directory, exist_ok=True)
        # Built under a name `checkpoints` skips, then renamed: a run
        # stopped mid-save leaves no partial checkpoint to resume from.
        staging = staging_directory(self.directory, f".{name}-")
        try:
            model = self.model
            save_adapter(model, staging, adapter_name=self.adapter_name)
            if self.on_save is not None:
                self.on_save(staging, model)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if self.keep is not None:
            for old in self.checkpoints[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
