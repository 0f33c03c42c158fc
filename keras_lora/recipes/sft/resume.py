"""Checkpoints of `keras-lora sft`, and `--resume` from the newest, exactly.

A run saves `OUT/checkpoints/step-N/` every `checkpoint_every` steps and
when it ends, keeping the newest `KEEP` (`keras_lora.checkpoint.
AdapterCheckpoint`'s schedule and layout). Each holds the adapter
(`load_adapter` reads it) and, beside it:

- `training_state.npz`: the trainable variables as training holds them,
  the optimizer's variables (its step count included) and the state of
  every seed generator (the LoRA dropout's). The trainable values are
  stored again because a PiSSA/OLoRA adapter is saved as its rank-2r
  equivalent on the original kernels, which does not load back into the
  residual layout that training continues in.
- `run.json`: the settings that shape the trajectory, digests of the files
  read, the train losses so far and the evaluation losses so far.

`--resume` restores all of it into the freshly built model and trains on
the batches not yet done (batches are a function of the seed), so the
losses and the final adapter are those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable

import keras
import numpy as np

from keras_lora.checkpoint import AdapterCheckpoint
from keras_lora.files import atomic_write
from keras_lora.recipes.sft.config import SftConfig

__all__ = [
    "CHECKPOINTS",
    "KEEP",
    "ResumePoint",
    "checkpoint_callback",
    "find_resume_point",
    "run_settings",
    "seed_states",
]

CHECKPOINTS = "checkpoints"
KEEP = 2
STATE = "training_state.npz"
RUN = "run.json"
# Settings a resumed run may change: where it stops and what it reports.
MAY_CHANGE = (
    "out",
    "inspect",
    "steps",
    "epochs",
    "eval_every",
    "checkpoint_every",
    "resume",
    "quiet",
    "generate_prompts",
    "generate_tokens",
    "merged_hf",
)
# Files whose content, not only their path, must be the checkpoint's.
FILES = ("data", "eval_data", "chat_template", "init_adapter")


def run_settings(config: SftConfig) -> dict:
    """What a resumed run must share with its checkpoint, JSON-ready.

    Every setting of `config` but `MAY_CHANGE`, the SHA-256 of each file
    read (`FILES`, and the model's `config.json`), and the Keras backend.

    Args:
        config: the run's settings.

    Returns:
        `{name: value}`.
    """
    settings = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name not in MAY_CHANGE
    }
    for name in FILES:
        settings[f"{name} content"] = _digest(getattr(config, name))
    settings["model config.json content"] = _digest(
        os.path.join(config.model, "config.json")
    )
    settings["backend"] = keras.backend.backend()
    return json.loads(json.dumps(settings))


def _digest(path: str | None) -> str | None:
    """SHA-256 of a file (of an adapter directory's files), or None."""
    if path is None or not os.path.exists(path):
        return None
    digest = hashlib.sha256()
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(path, n) for n in sorted(os.listdir(path))]
    for name in paths:
        if os.path.isfile(name):
            with open(name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The newest checkpoint of a run, to continue from.

    Args:
        directory: the checkpoint directory (`OUT/checkpoints/step-N`).
        step: optimizer steps it holds.
        train_loss: the loss of each of those steps.
        eval_loss_before: the evaluation loss before training.
        eval_loss_every: `[step, loss]` evaluations done so far.
    """

    directory: str
    step: int
    train_loss: list[float]
    eval_loss_before: float
    eval_loss_every: list[list[float]]

    def restore(self, model: keras.Model) -> None:
        """Set the trainable variables, the optimizer and the seed states.

        Args:
            model: the compiled model, with the run's LoRA layout.

        Raises:
            ValueError: when the checkpoint's variables do not fit it.
        """
        trainable = model.trainable_variables
        model.optimizer.build(trainable)
        groups = {
            "trainable": trainable,
            "optimizer": model.optimizer.variables,
            "seed": seed_states(model),
        }
        with np.load(os.path.join(self.directory, STATE)) as state:
            for group, variables in groups.items():
                saved = sorted(
                    (k for k in state.files if k.startswith(f"{group}/")),
                    key=lambda k: int(k.split("/")[1]),
                )
                shapes = [tuple(v.shape) for v in variables]
                if [state[k].shape for k in saved] != shapes:
                    raise ValueError(
                        f"{self.directory} holds {len(saved)} {group} "
                        f"variables that do not fit this model's "
                        f"{len(variables)}: start a new run without --resume"
                    )
                for variable, key in zip(variables, saved, strict=True):
                    variable.assign(state[key])


def seed_states(model: keras.Model) -> list:
    """The state variables of the model's seed generators (dropout's)."""
    variables = model.non_trainable_variables
    return [v for v in variables if v.name == "seed_generator_state"]


def find_resume_point(config: SftConfig) -> ResumePoint | None:
    """The checkpoint `config.resume` continues from; None when not resuming.

    Args:
        config: the run's settings.

    Returns:
        The newest checkpoint in `OUT/checkpoints`, checked against `config`.

    Raises:
        FileNotFoundError: `resume` with no checkpoint in `OUT`.
        ValueError: a setting differs from the checkpoint's (named), or the
            checkpoint holds more steps than the run has.
    """
    if not config.resume:
        return None
    directory = os.path.join(config.out, CHECKPOINTS)
    latest = AdapterCheckpoint(directory).latest
    if latest is None or not os.path.isfile(os.path.join(latest, RUN)):
        raise FileNotFoundError(
            f"--resume: no checkpoint in {directory}; run without --resume "
            "to start training (checkpoints are saved every --checkpoint-every "
            "steps)"
        )
    with open(os.path.join(latest, RUN)) as f:
        saved = json.load(f)
    ours = run_settings(config)
    for name in sorted(set(saved["settings"]) | set(ours)):
        theirs, mine = saved["settings"].get(name), ours.get(name)
        if theirs != mine:
            if name.endswith(" content"):
                what = f"{name[: -len(' content')]} has changed since"
            else:
                flag = "--" + name.replace("_", "-")
                what = f"{flag} is {mine!r} here, {theirs!r} in"
            raise ValueError(
                f"--resume: {what} the checkpoint {latest}; resume with the "
                "checkpoint's settings, or start a new run without --resume"
            )
    return ResumePoint(
        directory=latest,
        step=int(saved["step"]),
        train_loss=saved["train_loss"],
        eval_loss_before=saved["eval_loss_before"],
        eval_loss_every=saved["eval_loss_every"],
    )


def checkpoint_callback(
    config: SftConfig, resumed: bool, progress: Callable[[], dict]
) -> AdapterCheckpoint:
    """The callback that saves the run's checkpoints during `fit`.

    A run that does not resume first removes an earlier run's checkpoints
    (a later `--resume` would take them for its own).

    Args:
        config: the run's settings.
        resumed: whether this run continues from a checkpoint.
        progress: returns the losses so far, `{"train_loss": [...],
            "eval_loss_before": x, "eval_loss_every": [[step, loss], ...]}`.

    Returns:
        An `AdapterCheckpoint` that also writes `training_state.npz` and
        `run.json`.
    """
    directory = os.path.join(config.out, CHECKPOINTS)
    if not resumed and os.path.isdir(directory):
        shutil.rmtree(directory)
    settings = run_settings(config)

    def write_state(path: str, model: keras.Model) -> None:
        arrays = {}
        for group, variables in (
            ("trainable", model.trainable_variables),
            ("optimizer", model.optimizer.variables),
            ("seed", seed_states(model)),
        ):
            for i, variable in enumerate(variables):
                arrays[f"{group}/{i}"] = keras.ops.convert_to_numpy(variable)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write(os.path.join(path, STATE), buffer.getvalue())
        step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        run = {"step": step, "settings": settings, **progress()}
        atomic_write(
            os.path.join(path, RUN), (json.dumps(run, indent=1) + "\n").encode()
        )

    return AdapterCheckpoint(
        directory,
        every_n_steps=config.checkpoint_every,
        keep=KEEP,
        on_save=write_state,
    )
