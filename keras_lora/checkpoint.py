"""`AdapterCheckpoint`: save the adapter during `fit`, keeping the last few."""

from __future__ import annotations

import os
import re
import shutil

import keras

from keras_lora.adapter import save_adapter

_STEP_DIR = re.compile(r"step-(\d{8})")


class AdapterCheckpoint(keras.callbacks.Callback):
    """Saves the LoRA adapter every N steps and/or at each epoch end.

    Each checkpoint is an adapter directory `directory/step-00000123`
    (`save_adapter` format, loadable with `load_adapter`), named after the
    number of training steps taken so far. Only the newest `keep` are kept.

    Args:
        directory: where the checkpoints go; created if missing.
        every_n_steps: save after every N training steps; `None` for never.
        save_at_epoch_end: also save when an epoch ends.
        keep: how many checkpoints to keep (the newest); `None` keeps all.

    Example:

    >>> checkpoint = AdapterCheckpoint("/tmp/ckpt", every_n_steps=100, keep=3)
    >>> # model.fit(data, epochs=2, callbacks=[checkpoint])
    >>> # load_adapter(base_model, checkpoint.latest)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        every_n_steps: int | None = None,
        save_at_epoch_end: bool = True,
        keep: int | None = 3,
    ):
        super().__init__()
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
        self.steps = 0

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

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.every_n_steps and self.steps % self.every_n_steps == 0:
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        if self.save_at_epoch_end:
            self._save()

    def _save(self) -> None:
        target = os.path.join(self.directory, f"step-{self.steps:08d}")
        save_adapter(self.model, target)
        if self.keep is not None:
            for old in self.checkpoints[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
