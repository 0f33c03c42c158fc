"""Distributed-training checks, run in a process of their own.

- `python tests/dist_worker.py jax`: the `keras.distribution` checks
  (DataParallel, ModelParallel with `gpt2_layout_map`) on 8 virtual CPU
  devices; XLA_FLAGS must name the device count before JAX is imported.
- `python tests/dist_worker.py tf`: `tf.distribute.MirroredStrategy` on 2
  logical CPU devices, which must be set before TensorFlow starts.
- `python tests/dist_worker.py torch RANK WORLD INIT_FILE`: one rank of
  torch DistributedDataParallel on CPU (gloo); start WORLD of them at once.

Each prints one line, `DIST_RESULT {json}`, which tests/test_distribution.py
reads and judges. The tiny GPT-2 is built with the same weights in every
run, from a single-device reference.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import tempfile

# A run takes 10-30 s; if one hangs, print every thread's stack and exit
# (before the test's own timeout), so the test reports where.
faulthandler.dump_traceback_later(
    float(os.environ.get("DIST_WORKER_DUMP_AFTER", "200")), exit=True
)

MODE = sys.argv[1] if len(sys.argv) > 1 else "jax"
if MODE == "jax":
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    os.environ["XLA_FLAGS"] = " ".join(
        flags + ["--xla_force_host_platform_device_count=8"]
    )
elif MODE == "tf":
    os.environ["KERAS_BACKEND"] = "tensorflow"
elif MODE == "torch":
    os.environ["KERAS_BACKEND"] = "torch"
else:
    raise SystemExit(f"unknown mode {MODE!r}: use 'jax', 'tf' or 'torch'")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if MODE == "tf":
    import tensorflow as tf

    # Split the CPU into two logical devices before TensorFlow starts.
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_lora import (  # noqa: E402
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from keras_lora.families import GPT2  # noqa: E402
from tests.helpers import (  # noqa: E402
    constant_token_task,
    learnable_lm,
    randomize_lora_b,
    tiny_gpt2_lm,
    to_numpy,
    token_batch,
)

# Four heads, so the heads axis splits over a model axis of 4; no dropout,
# so every run computes the same function.
MODEL_ARGS = dict(num_heads=4, dropout=0.0)
STEPS = 3


def reference():
    """Single-device base and LoRA weights, and the LoRA weights' paths."""
    keras.utils.set_random_seed(0)
    lm = learnable_lm(**MODEL_ARGS)
    base = lm.get_weights()
    inject_lora(lm, rank=4, alpha=8.0, targets=GPT2.roles, seed=1)
    randomize_lora_b(lm, scale=0.1)
    return base, lm.get_weights(), [v.path for v in lm.weights]


def build(weights, scope=None, lora_paths=None):
    """A tiny GPT-2 holding `weights`, built in `scope`; with `lora_paths`
    (the reference's weight paths), LoRA on `GPT2.roles` is injected first."""
    with scope or contextlib.nullcontext():
        lm = tiny_gpt2_lm(**MODEL_ARGS)
        if lora_paths is not None:
            inject_lora(lm, rank=4, alpha=8.0, targets=GPT2.roles, seed=1)
            assert [v.path for v in lm.weights] == lora_paths
        lm.set_weights(weights)
    return lm


def compile_lm(lm):
    lm.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )


def train(lm, scope=None, steps=STEPS):
    """`steps` SGD steps through `fit` (one batch an epoch); the losses."""
    x, y, w = constant_token_task(batch=8)
    with scope or contextlib.nullcontext():
        compile_lm(lm)
        history = lm.fit(
            x, y, sample_weight=w, batch_size=8, epochs=steps, shuffle=False, verbose=0
        )
    return [float(v) for v in history.history["loss"]]


def logits(lm, scope=None):
    with scope or contextlib.nullcontext():
        return to_numpy(
            lm.predict(token_batch(batch=8, seed=3), batch_size=8, verbose=0)
        )


def predict_diff(lm, scope, expected, reset=False):
    """`predict` against `expected`: {"diff": max |difference|} or {"error"}.

    With `reset`, the compiled steps are dropped by hand first (as
    `merge_lora` does itself since it was fixed). On JAX a failed `predict`
    leaves the model's variables purged, so only a model's last call may
    fail."""
    if reset:
        lm.train_function = lm.test_function = lm.predict_function = None
    try:
        return {"diff": max_diff(logits(lm, scope()), expected)}
    except ValueError as e:
        return {"error": str(e)[:400]}


def factors(lm):
    return {
        v.path: to_numpy(v.value) for layer in lora_layers(lm) for v in layer.weights
    }


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def same_factors(a, b):
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------- JAX


def padded_spec(variable):
    """The variable's `PartitionSpec` as a list padded to its rank, or
    "single-device" for an array that is not laid out on the mesh."""
    import jax

    sharding = variable.value.sharding
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return "single-device"
    spec = [a if a is None or isinstance(a, str) else list(a) for a in sharding.spec]
    return spec + [None] * (len(variable.shape) - len(spec))


def jax_specs(lm):
    """`padded_spec` of each weight, by path."""
    return {v.path: padded_spec(v) for v in lm.weights}


def run_jax() -> dict:
    import doctest

    import keras_lora.distribution as distribution_module
    from keras_lora.distribution import distribute_lora, gpt2_layout_map

    out = {"devices": len(keras.distribution.list_devices())}
    base, full, paths = reference()

    single = build(full, lora_paths=paths)
    out["single_losses"] = train(single)
    single_logits = logits(single)
    out["logits_scale"] = float(np.max(np.abs(single_logits)))

    data_parallel = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()
    )
    dp = build(full, data_parallel.scope(), paths)
    out["dp_specs"] = jax_specs(dp)
    out["dp_losses"] = train(dp, data_parallel.scope())
    out["dp_logits_diff"] = max_diff(logits(dp, data_parallel.scope()), single_logits)

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=gpt2_layout_map(mesh), batch_dim_name="batch"
    )
    mp_scope = model_parallel.scope
    mp = build(full, mp_scope(), paths)
    out["mp_specs"] = jax_specs(mp)
    out["mp_losses"] = train(mp, mp_scope())
    mp_logits = logits(mp, mp_scope())
    out["mp_logits_diff"] = max_diff(mp_logits, single_logits)
    out["mp_specs_after_fit"] = jax_specs(mp)

    with tempfile.TemporaryDirectory() as tmp:
        # Sharded -> single device.
        save_adapter(mp, os.path.join(tmp, "from_mp"))
        plain = build(base)
        load_adapter(plain, os.path.join(tmp, "from_mp"))
        out["mp_to_single_factors_equal"] = same_factors(factors(plain), factors(mp))
        out["mp_to_single_logits_diff"] = max_diff(logits(plain), mp_logits)
        # Single device -> sharded, loaded inside the scope.
        save_adapter(single, os.path.join(tmp, "from_single"))
        sharded = build(base, mp_scope())
        with mp_scope():
            load_adapter(sharded, os.path.join(tmp, "from_single"))
        out["single_to_mp_specs"] = jax_specs(sharded)
        out["single_to_mp_factors_equal"] = same_factors(
            factors(sharded), factors(single)
        )
        out["single_to_mp_logits_diff"] = max_diff(
            logits(sharded, mp_scope()), single_logits
        )

    # merge_lora on the trained, sharded model.
    with mp_scope():
        merge_lora(mp)
    out["mp_merged_lora_layers"] = len(lora_layers(mp))
    out["mp_merged_specs"] = jax_specs(mp)
    with mp_scope():
        merged = to_numpy(mp(token_batch(batch=8, seed=3)))
    out["mp_merge_diff"] = max_diff(merged, mp_logits)
    out["mp_merged_predict"] = predict_diff(mp, mp_scope, mp_logits)

    # LoRA injected outside the scope, then laid out by distribute_lora.
    late = build(base, mp_scope())
    inject_lora(late, rank=4, alpha=8.0, targets=GPT2.roles, seed=1)
    late.set_weights(full)
    out["late_specs_before"] = {
        p: s for p, s in jax_specs(late).items() if p.endswith(("lora_a", "lora_b"))
    }
    distribute_lora(late, model_parallel)
    out["late_specs_after"] = jax_specs(late)
    # Adam's slots for a factor take the factor's layout.
    with mp_scope():
        adam = keras.optimizers.Adam()
        adam.build(late.trainable_variables)
    slots = {v.path.split("/", 1)[1]: v for v in adam.variables}
    out["late_adam_slot_specs"] = {
        f"{v.path}:{slot}": padded_spec(slots[f"{v.path.replace('/', '_')}_{slot}"])
        for v in late.trainable_variables
        for slot in ("momentum", "velocity")
    }
    out["late_losses"] = train(late, mp_scope(), steps=1)
    late_logits = logits(late, mp_scope())
    with mp_scope():
        merge_lora(late)
    out["late_merged_predict_reset"] = predict_diff(
        late, mp_scope, late_logits, reset=True
    )

    # The docstring example, on a (8, 1) mesh of the same devices.
    failures, attempted = doctest.testmod(distribution_module)
    out["doctest"] = {"failed": failures, "attempted": attempted}
    return out


# ---------------------------------------------------------------------- TF


def run_tf() -> dict:
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}
    base, full, paths = reference()

    single = build(full, lora_paths=paths)
    out["single_losses"] = train(single)
    single_logits = logits(single)
    out["logits_scale"] = float(np.max(np.abs(single_logits)))

    mirrored = build(full, strategy.scope(), paths)
    out["factor_types"] = sorted(
        {
            type(getattr(v, "value", v)).__name__
            for layer in lora_layers(mirrored)
            for v in (layer.lora_a, layer.lora_b)
        }
    )
    out["kernel_types"] = sorted(
        {
            type(getattr(layer.original_layer.kernel, "value", None)).__name__
            for layer in lora_layers(mirrored)
        }
    )
    out["mirrored_losses"] = train(mirrored, strategy.scope())
    mirrored_logits = logits(mirrored, strategy.scope())
    out["mirrored_logits_diff"] = max_diff(mirrored_logits, single_logits)

    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(mirrored, os.path.join(tmp, "from_mirrored"))
        plain = build(base)
        load_adapter(plain, os.path.join(tmp, "from_mirrored"))
        out["mirrored_to_single_factors_equal"] = same_factors(
            factors(plain), factors(mirrored)
        )
        out["mirrored_to_single_logits_diff"] = max_diff(logits(plain), mirrored_logits)
        save_adapter(single, os.path.join(tmp, "from_single"))
        replica = build(base, strategy.scope())
        with strategy.scope():
            load_adapter(replica, os.path.join(tmp, "from_single"))
        out["single_to_mirrored_factors_equal"] = same_factors(
            factors(replica), factors(single)
        )
        out["single_to_mirrored_logits_diff"] = max_diff(
            logits(replica, strategy.scope()), single_logits
        )

    with strategy.scope():
        merge_lora(mirrored)
    out["merged_lora_layers"] = len(lora_layers(mirrored))
    with strategy.scope():
        merged = to_numpy(mirrored(token_batch(batch=8, seed=3)))
    out["merge_diff"] = max_diff(merged, mirrored_logits)
    out["merged_predict"] = predict_diff(mirrored, strategy.scope, mirrored_logits)
    out["merged_predict_reset"] = predict_diff(
        mirrored, strategy.scope, mirrored_logits, reset=True
    )
    return out


# ------------------------------------------------------------------- torch


def run_torch(rank: int, world: int, init_file: str) -> None:
    """One rank of torch DistributedDataParallel (gloo, CPU) training LoRA
    with a plain torch loop, the way Keras's torch distribution guide does:
    `model.fit` has no DDP support."""
    import datetime
    import hashlib

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    base, full, paths = reference()
    out = {"rank": rank}
    if rank == 0:
        out["single_losses"] = train(build(full, lora_paths=paths))
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # and each collective
    )
    try:
        lm = build(full, lora_paths=paths)
        # DDP registers the parameters it syncs when it is built: after
        # inject_lora. Only the LoRA factors require gradients.
        params = [p for p in lm.parameters() if p.requires_grad]
        out["grad_params"] = len(params)
        ddp = torch.nn.parallel.DistributedDataParallel(lm)
        optimizer = torch.optim.SGD(params, lr=0.1)  # = keras SGD(0.1)
        x, y, _ = constant_token_task(batch=8)
        shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
        x = {k: torch.as_tensor(v[shard]) for k, v in x.items()}
        y = torch.as_tensor(y[shard]).long()
        losses = []
        for _ in range(STEPS):
            optimizer.zero_grad()
            logits = ddp(x)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            )
            loss.backward()
            optimizer.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total) / world)
        out["ddp_losses"] = losses
        digest = hashlib.sha256()
        for name, value in sorted(factors(lm).items()):
            digest.update(name.encode() + value.tobytes())
        out["factors_sha256"] = digest.hexdigest()
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Tearing down DDP and the process group sometimes hung once both ranks
    # had finished (2 runs in 6 here, in destructors after the function
    # returned): report and leave without any teardown.
    report(out)
    sys.stderr.flush()
    os._exit(0)


def report(result: dict) -> None:
    print("DIST_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if MODE == "jax":
        report(run_jax())
    elif MODE == "tf":
        report(run_tf())
    else:
        run_torch(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
