"""LoRA+: B factors get `ratio` x the learning rate, through compile/fit."""

import keras
import numpy as np
import pytest

from keras_lora import (
    LoraPlusOptimizer,
    inject_lora,
    lora_layers,
    lora_plus_optimizer,
    set_adapter,
)
from tests.helpers import dtype_policy, to_numpy


def adapted_model(second=True):
    keras.utils.set_random_seed(0)  # The same base weights each time.
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh", name="a"),
            keras.layers.Dense(4, name="b"),
        ]
    )
    inject_lora(model, rank=2, targets=("a", "b"), seed=1)
    if second:
        inject_lora(model, rank=3, targets="b", adapter_name="second", seed=2)
        set_adapter(model, ["default", "second"])  # Both train.
    rng = np.random.default_rng(0)
    for layer in lora_layers(model):
        for adapter in layer.adapters.by_name.values():
            # Non-zero B, so that A gets a gradient too.
            shape = tuple(adapter.lora_b.shape)
            adapter.lora_b.assign(rng.normal(0, 0.5, shape).astype("float32"))
    return model


def data():
    rng = np.random.default_rng(1)
    return (
        rng.normal(0, 1, (8, 6)).astype("float32"),
        rng.normal(0, 1, (8, 4)).astype("float32"),
    )


def one_step_updates(optimizer):
    model = adapted_model()
    before = [to_numpy(v.value).copy() for v in model.trainable_weights]
    model.compile(optimizer=optimizer, loss="mse")
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    # Keyed by position and name (the model's name differs between calls).
    return {
        f"{i}:{v.path.partition('/')[2]}": to_numpy(v.value) - before[i]
        for i, v in enumerate(model.trainable_weights)
    }


def test_one_sgd_step_scales_only_the_b_updates():
    plain = one_step_updates(keras.optimizers.SGD(0.1))
    plus = one_step_updates(LoraPlusOptimizer(keras.optimizers.SGD(0.1), ratio=4))
    names = sorted(plain)
    assert len(names) == 6  # A and B of 2 + 1 adapters.
    assert sum("lora_b" in n for n in names) == 3
    for name in names:
        assert np.abs(plain[name]).max() > 1e-3, name  # Every factor moved.
        factor = 4.0 if name.rpartition("/")[2].startswith("lora_b") else 1.0
        np.testing.assert_allclose(
            plus[name], factor * plain[name], rtol=0, atol=1e-6, err_msg=name
        )


def test_adam_with_ratio_trains_through_compile_and_fit():
    model = adapted_model()
    model.compile(optimizer=lora_plus_optimizer("adam", 1e-3, ratio=16), loss="mse")
    x, y = data()
    history = model.fit(x, y, batch_size=4, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    optimizer = model.optimizer
    assert int(optimizer.iterations) == 10
    # Two real optimizers with their own moments: B's state is B's alone.
    assert int(optimizer.b_optimizer.iterations) == 10
    b_paths = {v.path for v in optimizer.b_optimizer._trainable_variables}
    assert b_paths and all(p.rpartition("/")[2].startswith("lora_b") for p in b_paths)


def test_learning_rate_setter_keeps_the_ratio_and_config_round_trips():
    optimizer = lora_plus_optimizer("sgd", learning_rate=0.01, ratio=8)
    optimizer.learning_rate = 0.5
    assert float(optimizer.learning_rate) == pytest.approx(0.5)
    assert float(optimizer.b_optimizer.learning_rate) == pytest.approx(4.0)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, LoraPlusOptimizer) and restored.ratio == 8.0
    assert float(restored.b_optimizer.learning_rate) == pytest.approx(4.0)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    scheduled = LoraPlusOptimizer(keras.optimizers.Adam(schedule), ratio=2)
    b_schedule = scheduled.b_optimizer._learning_rate
    assert float(b_schedule(10)) == pytest.approx(2 * float(schedule(10)))


def test_whole_model_save_keeps_the_optimizer(tmp_path):
    model = adapted_model(second=False)  # Whole-model saves hold one adapter.
    model.compile(optimizer=lora_plus_optimizer("adam", 1e-3, ratio=16), loss="mse")
    x, y = data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(restored.optimizer, LoraPlusOptimizer)
    for mine, theirs in zip(
        model.optimizer.variables, restored.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(to_numpy(mine), to_numpy(theirs))


def test_mixed_precision_wraps_it_in_a_loss_scale_optimizer():
    with dtype_policy("mixed_float16"):
        model = adapted_model(second=False)
    model.compile(optimizer=lora_plus_optimizer("adam", 1e-2), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = data()
    before = to_numpy(lora_layers(model)[0].lora_b.value).copy()
    # The first steps overflow in float16 and are skipped while the loss
    # scale comes down from 2**15 (TensorFlow: 6 of them), as with any
    # optimizer.
    history = model.fit(x, y, batch_size=4, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert np.abs(to_numpy(lora_layers(model)[0].lora_b.value) - before).max() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer="adam", ratio=0), "positive number"),
        (dict(optimizer="nonesuch"), "Cannot make optimizer"),
        (dict(optimizer=keras.optimizers.Adam(), learning_rate=0.1), "instance"),
        (dict(optimizer="adam", loss_scale_factor=128.0), "loss_scale_factor"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_plus_optimizer(**kwargs)
