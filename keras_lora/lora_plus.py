"""LoRA+ (Hayou et al., 2024): B factors learn `ratio` times faster than A.

PEFT's `create_loraplus_optimizer` gives the B factors their own parameter
group with learning rate × ratio. Scaling B's gradients instead would not
do it: Adam divides each gradient by its own running magnitude, so a
constant factor cancels. `LoraPlusOptimizer` therefore wraps two real
optimizers, as Keras's `LossScaleOptimizer` wraps one: one steps the B
factors at the scaled learning rate, the other everything else at the base
learning rate, each with its own state.

A B factor is any variable named `lora_b` or `lora_b_<adapter>` (every
adapter's B; see `keras_lora.layer` and `keras_lora.adapter_state`).
"""

from __future__ import annotations

import re

import keras
from keras import ops

from keras_lora import _keras_internals

# Every adapter's B factor: "lora_b" (the first), "lora_b_<name>" (others).
B_FACTOR = re.compile(r"lora_b(_.+)?")


def is_b_factor(variable) -> bool:
    """Whether `variable` is a LoRA B factor (by its name)."""
    return bool(B_FACTOR.fullmatch(variable.name))


@keras.saving.register_keras_serializable(package="keras_lora")
class ScaledLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule times a constant (B's schedule under LoRA+)."""

    def __init__(self, schedule, factor: float):
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step):
        return ops.multiply(self.schedule(step), self.factor)

    def get_config(self):
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "factor": self.factor,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        schedule = keras.saving.deserialize_keras_object(config.pop("schedule"))
        return cls(schedule, **config)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoraPlusOptimizer(keras.optimizers.Optimizer):
    """Trains LoRA B factors at `ratio` × the learning rate of the rest.

    Wraps `optimizer` (used for every variable that is not a B factor) and
    a copy of it built from its config with the learning rate multiplied
    by `ratio` (a schedule is wrapped in `ScaledLearningRate`), used for
    the B factors. Works with `model.compile(optimizer=...)` and `fit` on
    every backend, and serialises (`get_config`, `model.save`).
    `learning_rate` reads the base rate; setting it (a float, e.g. from a
    learning-rate callback) sets both, keeping the ratio. `iterations`
    counts the wrapper's steps.

    Args:
        optimizer: a Keras optimizer instance (not built yet) or name.
        ratio: B's learning rate over A's, a positive number (LoRA+
            recommends 16, PEFT's documentation too).
        name: the wrapper's name.

    Example:

    >>> from keras_lora import inject_lora
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    >>> _ = inject_lora(model, rank=1, targets="d")
    >>> optimizer = LoraPlusOptimizer(keras.optimizers.SGD(0.01), ratio=16)
    >>> round(float(optimizer.b_optimizer.learning_rate), 6)  # float32
    0.16
    >>> model.compile(optimizer=optimizer, loss="mse")
    """

    def __init__(self, optimizer, ratio: float = 16.0, name: str | None = None):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
            raise ValueError(
                "`ratio` (B's learning rate over A's) must be a positive "
                f"number, e.g. 16. Received: ratio={ratio!r}"
            )
        optimizer = keras.optimizers.get(optimizer)
        if isinstance(optimizer, LoraPlusOptimizer):
            raise ValueError("`optimizer` is already a LoraPlusOptimizer.")
        if optimizer.built:
            raise ValueError(
                f"Optimizer '{optimizer.name}' is already built (it has "
                "stepped); LoRA+ needs a new one to split the variables."
            )
        for option in ("loss_scale_factor", "gradient_accumulation_steps"):
            # The wrapper steps once per batch and Keras scales the loss
            # through the outer optimizer: inner ones must do neither.
            if getattr(optimizer, option, None):
                raise ValueError(
                    f"LoraPlusOptimizer does not support `{option}` on the "
                    "wrapped optimizer. For mixed precision, Keras wraps the "
                    "LoraPlusOptimizer in a LossScaleOptimizer by itself."
                )
        super().__init__(learning_rate=0.0, name=name or "lora_plus")
        self.ratio = float(ratio)
        self.base_optimizer = optimizer
        config = optimizer.get_config()
        config["name"] = f"{optimizer.name}_b"
        config["learning_rate"] = self._scaled(
            _keras_internals.optimizer_learning_rate(optimizer)
        )
        self.b_optimizer = type(optimizer).from_config(config)

    def _scaled(self, learning_rate):
        if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            return ScaledLearningRate(learning_rate, self.ratio)
        if isinstance(learning_rate, keras.Variable) or isinstance(
            learning_rate, (int, float)
        ):
            return float(ops.convert_to_numpy(learning_rate)) * self.ratio
        raise ValueError(
            "LoraPlusOptimizer needs a float or a LearningRateSchedule "
            f"learning rate; got {type(learning_rate).__name__}."
        )

    def build(self, var_list):
        var_list = list(var_list)
        self.base_optimizer.build([v for v in var_list if not is_b_factor(v)])
        self.b_optimizer.build([v for v in var_list if is_b_factor(v)])
        super().build(var_list)

    @property
    def variables(self):
        # The JAX trainer maps optimizer state by this list: own first.
        return (
            _keras_internals.optimizer_own_variables(self)
            + self.base_optimizer.variables
            + self.b_optimizer.variables
        )

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "Build the optimizer (`optimizer.build(variables)`) or pass "
                    "`trainable_variables` before applying gradients."
                )
            trainable_variables = _keras_internals.optimizer_built_variables(self)
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name):
                self.build(trainable_variables)
            self.built = True
        groups = {True: ([], []), False: ([], [])}
        for grad, variable in zip(grads, trainable_variables, strict=True):
            group = groups[is_b_factor(variable)]
            group[0].append(grad)
            group[1].append(variable)
        for optimizer, (group_grads, group_vars) in (
            (self.base_optimizer, groups[False]),
            (self.b_optimizer, groups[True]),
        ):
            if group_vars:
                optimizer.apply(group_grads, group_vars)
        self.iterations.assign_add(1)

    @property
    def learning_rate(self):
        return self.base_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.base_optimizer.learning_rate = learning_rate
        self.b_optimizer.learning_rate = self._scaled(learning_rate)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.base_optimizer.exclude_from_weight_decay(var_list, var_names)
        self.b_optimizer.exclude_from_weight_decay(var_list, var_names)

    def finalize_variable_values(self, var_list):
        self.base_optimizer.finalize_variable_values(
            [v for v in var_list if not is_b_factor(v)]
        )
        self.b_optimizer.finalize_variable_values(
            [v for v in var_list if is_b_factor(v)]
        )

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.base_optimizer),
            "ratio": self.ratio,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(optimizer, **config)


def lora_plus_optimizer(
    optimizer: str | keras.optimizers.Optimizer = "adam",
    learning_rate: float | None = None,
    ratio: float = 16.0,
    **kwargs,
) -> LoraPlusOptimizer:
    """A LoRA+ optimizer: B factors at `learning_rate × ratio`, the rest at
    `learning_rate` (PEFT's `create_loraplus_optimizer`).

    Args:
        optimizer: an optimizer name ("adam", "adamw", "sgd", ...) or class
            or a fresh optimizer instance (then `learning_rate` and
            `kwargs` must be left out).
        learning_rate: the base learning rate (A factors and any other
            trainable weight); by default the optimizer's own default.
        ratio: B's learning rate over A's (16 in LoRA+ and PEFT's docs).
        **kwargs: more arguments for the optimizer (`weight_decay`, ...).

    Returns:
        A `LoraPlusOptimizer`, for `model.compile(optimizer=...)`.

    Raises:
        ValueError: for an unknown optimizer, a non-positive `ratio`, or
            arguments given with an optimizer instance.

    Example:

    >>> optimizer = lora_plus_optimizer("adamw", learning_rate=1e-4, ratio=16)
    >>> round(float(optimizer.b_optimizer.learning_rate), 6)
    0.0016
    """
    if isinstance(optimizer, keras.optimizers.Optimizer):
        if learning_rate is not None or kwargs:
            raise ValueError(
                "Pass `learning_rate` and other arguments to the optimizer "
                "you built, or pass its name instead of an instance."
            )
        return LoraPlusOptimizer(optimizer, ratio=ratio)
    if learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    if isinstance(optimizer, type):
        return LoraPlusOptimizer(optimizer(**kwargs), ratio=ratio)
    try:
        instance = keras.optimizers.get({"class_name": optimizer, "config": kwargs})
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"Cannot make optimizer {optimizer!r} with {kwargs}: {e}"
        ) from None
    return LoraPlusOptimizer(instance, ratio=ratio)
