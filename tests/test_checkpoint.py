"""AdapterCheckpoint: when checkpoints land, what they hold, how many stay."""

import os

import keras
import keras_hub
import numpy as np
import pytest

from keras_lora import (
    AdapterCheckpoint,
    inject_lora,
    load_adapter,
    lora_layers,
    set_adapter,
)
from keras_lora.adapter_format import read_adapter_config
from tests.helpers import constant_token_task, learnable_lm, mlp, to_numpy


def compiled(lm, learning_rate=3e-2):
    lm.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lm


def test_adapter_checkpoint_keeps_last_k(tmp_path):
    lm = learnable_lm()
    lm.backbone.save_to_preset(str(tmp_path / "base"))
    inject_lora(lm, rank=2)
    x, y, w = constant_token_task(batch=10)
    checkpoint = AdapterCheckpoint(tmp_path / "ckpt", every_n_steps=2, keep=2)
    compiled(lm).fit(
        x, y, sample_weight=w, batch_size=2, epochs=1, callbacks=[checkpoint], verbose=0
    )
    assert [os.path.basename(p) for p in checkpoint.checkpoints] == [
        "step-00000004",
        "step-00000005",
    ]
    # Renamed from a staging directory, with a plain directory's permissions.
    os.makedirs(tmp_path / "plain")
    mode = os.stat(tmp_path / "plain").st_mode
    assert os.stat(checkpoint.latest).st_mode == mode
    restored = keras_hub.models.GPT2CausalLM.from_preset(
        str(tmp_path / "base"), preprocessor=None
    )
    load_adapter(restored, checkpoint.latest)
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(lm(x)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(every_n_steps=0),
        dict(keep=0),
        dict(every_n_steps=None, save_at_epoch_end=False),
    ],
)
def test_adapter_checkpoint_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        AdapterCheckpoint(tmp_path, **kwargs)


class RecordLoraB(keras.callbacks.Callback):
    """The first LoRA B after each callback, keyed by the optimizer's step."""

    def __init__(self):
        super().__init__()
        self.by_step = {}

    def on_train_batch_end(self, batch, logs=None):
        model = self.model  # On JAX, reading `model` syncs its state.
        step = int(to_numpy(model.optimizer.iterations))
        self.by_step[step] = to_numpy(lora_layers(model)[0].lora_b).copy()


# 10 samples in batches of 2: 5 steps an epoch, 10 in two epochs. With two
# steps per execution the callbacks run after steps 2, 4, 5, 7, 9 and 10; a
# checkpoint is due at each multiple of 2, so it lands at the first of those
# at or after it. Counting callbacks instead (the old bug) named the saves
# at steps 4, 7 and 10 "step-2", "step-4" and "step-6".
EXPECTED_STEPS = {1: [2, 4, 6, 8, 10], 2: [2, 4, 7, 9, 10]}


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_checkpoints_land_at_optimizer_steps(tmp_path, steps_per_execution):
    if steps_per_execution > 1 and keras.backend.backend() == "torch":
        pytest.skip("Keras runs one step per execution on the torch backend")
    model = mlp()
    inject_lora(model, rank=2, targets="hidden_1")
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 784)).astype("float32")
    y = rng.normal(size=(10, 10)).astype("float32")
    checkpoint = AdapterCheckpoint(
        tmp_path, every_n_steps=2, save_at_epoch_end=False, keep=None
    )
    recorder = RecordLoraB()
    model.fit(
        x,
        y,
        batch_size=2,
        epochs=2,
        shuffle=False,
        callbacks=[checkpoint, recorder],
        verbose=0,
    )
    steps = [int(os.path.basename(p)[5:]) for p in checkpoint.checkpoints]
    assert steps == EXPECTED_STEPS[steps_per_execution]
    assert checkpoint.steps == int(to_numpy(model.optimizer.iterations)) == 10
    # Each checkpoint holds the factors of the step it is named after.
    for path, step in zip(checkpoint.checkpoints, steps, strict=True):
        assert read_adapter_config(path)["layers"][0]["path"] == "mlp/hidden_1"
        fresh = mlp()
        load_adapter(fresh, path)
        np.testing.assert_array_equal(
            to_numpy(lora_layers(fresh)[0].lora_b), recorder.by_step[step]
        )


def test_a_second_fit_continues_the_count(tmp_path):
    model = mlp()
    inject_lora(model, rank=2, targets="hidden_1")
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((6, 784), "float32"), np.zeros((6, 10), "float32")
    checkpoint = AdapterCheckpoint(tmp_path, every_n_steps=None, keep=None)
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[checkpoint], verbose=0)
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[checkpoint], verbose=0)
    assert [os.path.basename(p) for p in checkpoint.checkpoints] == [
        "step-00000003",
        "step-00000006",
    ]


def test_data_of_unknown_length_names_checkpoints_by_steps_taken(tmp_path):
    # A generator has no length. Keras's TensorFlow trainer counts one
    # optimizer iteration more than it steps when such data runs out.
    model = mlp()
    inject_lora(model, rank=2, targets="hidden_1")
    model.compile(optimizer="sgd", loss="mse")

    def four_batches():
        for _ in range(4):
            yield np.ones((2, 784), "float32"), np.zeros((2, 10), "float32")

    checkpoint = AdapterCheckpoint(tmp_path, every_n_steps=3, keep=None)
    model.fit(four_batches(), epochs=1, callbacks=[checkpoint], verbose=0)
    assert [os.path.basename(p) for p in checkpoint.checkpoints] == [
        "step-00000003",
        "step-00000004",
    ]
    assert checkpoint.steps == 4


def test_checkpoint_saves_the_named_adapter(tmp_path):
    model = mlp()
    inject_lora(model, rank=2, targets="hidden_1")
    inject_lora(model, rank=3, targets="hidden_2", adapter_name="b")
    set_adapter(model, "b")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = np.ones((4, 784), "float32"), np.ones((4, 10), "float32")
    # Without a name, a model holding two adapters is refused before any
    # step (not at the first save); an unknown name too.
    for kwargs, match in [({}, r"\['default', 'b'\].*adapter_name="),
                          ({"adapter_name": "c"}, r"no adapter 'c'")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            model.fit(
                x, y, callbacks=[AdapterCheckpoint(tmp_path, **kwargs)], verbose=0
            )
        assert int(to_numpy(model.optimizer.iterations)) == 0
    assert not os.listdir(tmp_path)
    checkpoint = AdapterCheckpoint(tmp_path / "b", adapter_name="b")
    model.fit(x, y, batch_size=2, callbacks=[checkpoint], verbose=0)
    config = read_adapter_config(checkpoint.latest)
    assert config["adapter_name"] == "b"
    assert [e["path"] for e in config["layers"]] == ["mlp/hidden_2"]
    fresh = mlp()
    load_adapter(fresh, checkpoint.latest)
    trained = lora_layers(model)[1].adapters["b"]
    assert lora_layers(fresh)[0].adapter_name == "b"
    for ours, theirs in zip(lora_layers(fresh)[0].adapters["b"].variables,
                            trained.variables, strict=True):  # fmt: skip
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    assert np.any(to_numpy(trained.lora_b) != 0)  # It trained.
