"""ModelParallel training of tiny keras-hub family models, as a subprocess.

Run as `python tests/family_dist_worker.py FAMILY...`: JAX must see 8
virtual CPU devices, which XLA_FLAGS has to say before JAX starts. For
each family, trains the same LoRA model a few steps on one device and
under `keras.distribution.ModelParallel` with `layout_map(family, mesh)`
(mesh (4, 2): batch 4, model 2, which divides the 2 key/value heads), and
prints one JSON object: the losses, and the sharded variables' layouts.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_lora import inject_lora  # noqa: E402
from keras_lora.families import layout_map  # noqa: E402
from tests.family_cases import CASES, VOCAB  # noqa: E402

STEPS = 3


def build(case, weights=None):
    keras.utils.set_random_seed(0)
    lm = case.make_task(case.make_backbone())
    inject_lora(lm, rank=2, alpha=4.0, targets=case.family.roles, seed=0)
    if weights is not None:
        lm.set_weights(weights)
    lm.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lm


def train(lm, x, y):
    # train_on_batch returns [loss, *metrics] when the model has metrics.
    return [float(np.ravel(lm.train_on_batch(x, y))[0]) for _ in range(STEPS)]


def run(case) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (8, 9)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((8, 8), "int32")}
    y = ids[:, 1:]
    single = build(case)
    weights = single.get_weights()
    single_losses = train(single, x, y)

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((4, 2), ("batch", "model"), devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map(case.family, mesh), batch_dim_name="batch"
    )
    with distribution.scope():
        parallel = build(case, weights)
        parallel_losses = train(parallel, x, y)
    specs = {
        v.path: str(v.value.sharding.spec)
        for v in parallel.weights
        if "model" in str(getattr(v.value.sharding, "spec", ""))
    }
    return {
        "devices": len(devices),
        "single": single_losses,
        "parallel": parallel_losses,
        "sharded": specs,
    }


if __name__ == "__main__":
    by_id = {case.id: case for case in CASES}
    print(json.dumps({name: run(by_id[name]) for name in sys.argv[1:]}))
