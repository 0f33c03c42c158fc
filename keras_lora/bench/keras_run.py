"""A Keras benchmark run: full, lora, builtin or floor, on one backend.

`keras_run(spec)` builds the GPT-2 of the spec, turns it into the run
(`prepare_run`), trains it with the recipes' optimizer and `StepLog`, and
measures step time, peak memory, held-out loss, adapter size and, for
LoRA, inference latency unmerged and merged against the base.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import tempfile
import time

import numpy as np

from keras_lora.bench.common import (
    current_rss_bytes,
    eval_data,
    file_bytes,
    step_stats,
    token_data,
)
from keras_lora.callbacks import host_peak_rss_bytes
from keras_lora.families import GPT2


def keras_run(spec: dict) -> dict:
    import keras
    import keras_hub  # noqa: F401  (imported before the baseline is read)

    import keras_lora
    from keras_lora.callbacks import GPUMemoryCallback
    from keras_lora.recipes.training import StepLog

    keras.utils.set_random_seed(spec["seed"])
    set_dtype_policies(spec)
    tokens, labels = token_data(spec)
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    # One tiny op starts the backend's runtime (JAX, TF), so its buffers
    # count in the baseline and not as the run's training memory.
    keras.ops.convert_to_numpy(keras.ops.ones((2,)) + 1)
    baseline_rss = current_rss_bytes()

    run = spec["run"]
    t0 = time.perf_counter()
    with remat_scope(spec, keras):
        lm = build_lm(spec)
        if spec.get("quantize_build", "after") == "after":
            # "during": build_lm built it quantized.
            if spec.get("quantize", "none") != "none":
                lm.quantize(spec["quantize"])
        prepare_run(lm, run, spec)
    remat_blocks(lm, spec)
    build_s = time.perf_counter() - t0
    trainable = sum(math.prod(v.shape) for v in lm.trainable_weights)
    frozen = sum(math.prod(v.shape) for v in lm.non_trainable_weights)
    # What fit trains: the model, or the chunked-loss wrapper sharing its
    # layers (only one chunk of the sequence has logits at a time).
    model = training_model(lm, spec)

    timer = StepLog()
    memory = GPUMemoryCallback(target_batches=[spec["warmup"]])
    build_peak = host_peak_rss_bytes()
    built_rss = current_rss_bytes()
    model.fit(
        x,
        labels,
        batch_size=spec["batch"],
        epochs=1,
        shuffle=False,
        callbacks=[timer, memory],
        verbose=0,
    )
    eval_loss = keras_eval_loss(lm, spec)
    result = {
        "trainable_params": int(trainable),
        "frozen_params": int(frozen),
        "build_s": round(build_s, 2),
        "jit_compile": bool(getattr(lm, "jit_compile", False)),
        "memory_device": memory.device,
        "peak_memory_gb": memory.peak_usage,
        "peak_memory_readings": dict(
            zip(memory.labels, memory.memory_usage, strict=True)
        ),
        "final_loss": round(timer.losses[-1], 4),
        "mean_loss": round(statistics.fmean(timer.losses), 4),
        "eval_loss": eval_loss,
    }
    if not memory.on_accelerator:
        peak = max(build_peak, host_peak_rss_bytes())
        result["process_peak_rss_gb"] = round(peak / 2**30, 3)
        # The build's own peak (model built, quantized, injected, compiled)
        # and what stays resident after it, beside the training peak.
        result["build_peak_rss_gb"] = round(build_peak / 2**30, 3)
        if built_rss is not None:
            result["rss_after_build_gb"] = round(built_rss / 2**30, 3)
        if baseline_rss is not None:
            result["baseline_rss_gb"] = round(baseline_rss / 2**30, 3)
            result["build_increment_gb"] = round(
                max(0, build_peak - baseline_rss) / 2**30, 3
            )
            result["training_increment_gb"] = round(
                max(0, peak - baseline_rss) / 2**30, 3
            )
    elif memory.peak_usage is not None:
        # Device memory: nothing of this process was on the device before
        # the model was built, so all of its peak is the run's increment.
        result["training_increment_gb"] = memory.peak_usage
    result.update(xla_memory(model, x, labels, spec))
    result.update(step_stats(timer.step_times, timer.cpu_times, spec))
    result.update(adapter_size(lm, spec, keras_lora))
    # Latency is measured against a float base built alike: only the plain
    # LoRA run has one to compare with.
    if run == "lora" and not spec.get("variant"):
        result.update(inference_latency(lm, spec, x, keras_lora))
    return result


def prepare_run(lm, run: str, spec: dict) -> None:
    """Turn a freshly built model into `run` and compile it (AdamW, CE)."""
    import keras_lora
    from keras_lora.recipes.training import optimizer_and_loss

    if run == "lora":
        keras_lora.inject_lora(
            lm, rank=spec["rank"], alpha=spec["alpha"], targets=spec["targets"]
        )
    elif run == "builtin":
        lm.backbone.enable_lora(spec["rank"], target_layer_names=spec["targets"])
    elif run == "floor":
        freeze_all_but_first_bias(lm)
    elif run != "full":
        raise ValueError(f"Unknown run {run!r}.")
    # The floor trains one bias: excluding it from weight decay would leave
    # Keras's torch AdamW an empty list to decay, which it cannot handle
    # (RuntimeError in torch._foreach_mul_; see RESULTS.md).
    optimizer, loss = optimizer_and_loss(
        spec["learning_rate"], exclude_from_decay=run != "floor"
    )
    # No metrics: keras-hub's default accuracy is an argmax over the
    # vocabulary every step that the PEFT peer does not compute.
    lm.compile(optimizer=optimizer, loss=loss, weighted_metrics=[])


def remat_blocks(lm, spec: dict) -> int:
    """For `spec["remat"] == "blocks"`, `remat_layers` on every transformer
    block of the built model; returns how many were wrapped."""
    if spec.get("remat", "none") != "blocks":
        return 0
    from keras_lora.remat import remat_layers

    blocks = [
        lm.backbone.get_layer(GPT2.block.format(block=i))
        for i in range(spec["arch"]["num_layers"])
    ]
    return remat_layers(blocks)


def training_model(lm, spec: dict):
    """`lm`, or for `spec["loss"] == "chunked"` a `ChunkedCausalLM` over it
    compiled with the same optimizer (the loss is its own)."""
    if spec.get("loss", "dense") == "dense":
        return lm
    import keras_lora
    from keras_lora.recipes.training import optimizer_and_loss

    model = keras_lora.chunked_causal_lm(lm, num_chunks=spec.get("loss_chunks", 8))
    optimizer, _ = optimizer_and_loss(
        spec["learning_rate"], exclude_from_decay=spec["run"] != "floor"
    )
    model.compile(optimizer=optimizer)
    return model


def xla_memory(model, x: dict, labels, spec: dict) -> dict:
    """XLA's buffer assignment for one training step (JAX only; after the
    timed run, so it cannot raise the measured peak).

    `temp` is what the step allocates beyond its inputs and outputs
    (activations, logits, gradients before the update); `arguments` the
    state and batch it is given (weights, optimizer moments). Empty on
    other backends or if Keras's step cannot be lowered this way.
    """
    import keras

    if keras.backend.backend() != "jax":
        return {}
    try:
        batch = {k: v[: spec["batch"]] for k, v in x.items()}
        data = (batch, labels[: spec["batch"]], None)
        analysis = compiled_train_step(model, data).memory_analysis()
        gb = 2**30
        return {
            "xla_temp_gb": round(analysis.temp_size_in_bytes / gb, 3),
            "xla_arguments_gb": round(analysis.argument_size_in_bytes / gb, 3),
            "xla_outputs_gb": round(analysis.output_size_in_bytes / gb, 3),
        }
    except Exception as error:  # A diagnostic: never fails the run.
        return {"xla_memory_error": f"{type(error).__name__}: {error}"[:300]}


def compiled_train_step(model, data):
    """`model`'s jitted train step compiled for `data` (JAX; not run), for
    XLA's memory and cost analyses. The optimizer must be built (a step
    taken, or `model._symbolic_build(data_batch=data)`)."""
    import jax

    from keras_lora import _keras_internals

    state = _keras_internals.jax_train_state(model)
    return jax.jit(model.train_step).lower(state, data).compile()


def set_dtype_policies(spec: dict) -> None:
    """The global dtype policy the spec asks for: its `dtype_policy`
    (e.g. "mixed_bfloat16"), then a half-precision `base_dtype`."""
    import keras

    if spec.get("dtype_policy"):
        keras.config.set_dtype_policy(spec["dtype_policy"])
    if spec.get("base_dtype", "float32") != "float32":
        # A half-precision base: every weight (LoRA's too) in that dtype.
        keras.config.set_dtype_policy(spec["base_dtype"])


def remat_scope(spec: dict, keras):
    """`keras.RematScope(mode)` for the spec's `remat`, else a no-op scope.

    Keras reads the mode when a layer is created, so the model is built
    and injected inside it.
    """
    mode = spec.get("remat", "none")
    # "blocks" is applied after the build (`remat_layers`), not by a scope.
    return keras.RematScope(mode=None if mode in ("none", "blocks") else mode)


def keras_eval_loss(lm, spec: dict) -> float | None:
    """Mean loss on the held-out batches after training (None without)."""
    held_out = eval_data(spec)
    if held_out is None:
        return None
    tokens, labels = held_out
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    loss = lm.evaluate(x, labels, batch_size=spec["batch"], verbose=0)
    return round(float(np.ravel(loss)[0]), 4)


def build_lm(spec: dict):
    """The spec's GPT-2; quantized layer by layer for `quantize_build`
    "during" (never a whole float copy; random weights only)."""
    import keras_hub

    mode = spec.get("quantize", "none")
    if mode != "none" and spec.get("quantize_build", "after") == "during":
        import keras_lora
        from keras_lora.families import quantized_dtype

        if spec["preset"]:
            raise ValueError(
                "--quantize-build during builds random weights; a preset's "
                "float weights cannot be loaded into quantized layers."
            )
        dtype = quantized_dtype(GPT2, mode)
        backbone = keras_hub.models.GPT2Backbone(
            **spec["arch"], **dropout(spec), dtype=dtype
        )
        keras_lora.initialize_quantized(backbone)
    elif spec["preset"]:
        backbone = keras_hub.models.GPT2Backbone.from_preset(spec["preset"])
    else:
        backbone = keras_hub.models.GPT2Backbone(**spec["arch"], **dropout(spec))
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def dropout(spec: dict) -> dict:
    """`GPT2Backbone`'s dropout argument when the spec sets one."""
    rate = spec.get("dropout")
    return {} if rate is None else {"dropout": rate}


def freeze_all_but_first_bias(lm) -> None:
    """Train only the bias of block 0's first projection (GPT-2: query)."""
    import keras_lora

    path = f"{GPT2.block.format(block=0)}/{GPT2.projections[0].path}"
    (layer,) = keras_lora.target_layers(lm.backbone, [path])
    bias = layer.bias
    lm.trainable = True
    for variable in lm.weights:
        variable.trainable = variable is bias


def adapter_size(lm, spec: dict, keras_lora) -> dict:
    """Bytes a user must keep to restore the fine-tuned model."""
    run = spec["run"]
    if run in ("full", "floor"):
        bytes_ = sum(
            math.prod(v.shape) * np.dtype(v.dtype).itemsize
            for v in lm.trainable_weights
        )
        return {"adapter_bytes": int(bytes_), "adapter_source": "trainable weights"}
    with tempfile.TemporaryDirectory() as tmp:
        if run == "builtin":
            lm.backbone.save_lora_weights(os.path.join(tmp, "adapter.lora.h5"))
            source = "backbone.save_lora_weights (.lora.h5)"
        else:
            keras_lora.save_adapter(lm, os.path.join(tmp, "adapter"))
            source = "keras_lora.save_adapter (safetensors)"
        return {**file_bytes(tmp), "adapter_source": source}


def inference_latency(lm, spec: dict, x: dict, keras_lora) -> dict:
    """Median forward pass (`predict_on_batch`) of LoRA and merged vs base.

    Each is timed against a freshly built base model of the same
    architecture, alternating calls in ABBA order, so drift in the
    machine's speed and any cost of going first affect both alike.
    """
    batch = {k: v[: spec["batch"]] for k, v in x.items()}
    runs = spec["inference_runs"]
    base = build_lm(spec)

    def predict(model):
        return lambda: model.predict_on_batch(batch)

    unmerged, base_1 = latency_samples([predict(lm), predict(base)], runs)
    keras_lora.merge_lora(lm)  # Drops the compiled predict function too.
    merged, base_2 = latency_samples([predict(lm), predict(base)], runs)
    median = statistics.median
    return {
        "inference_unmerged_s": round(median(unmerged), 4),
        "inference_base_with_unmerged_s": round(median(base_1), 4),
        "inference_merged_s": round(median(merged), 4),
        "inference_base_s": round(median(base_2), 4),
        "inference_samples_s": {
            "unmerged": unmerged,
            "base (with unmerged)": base_1,
            "merged": merged,
            "base": base_2,
        },
    }


def latency_samples(functions, runs: int, warmup: int = 2) -> list[list[float]]:
    """Seconds per call of each function, alternating them ABBA-style."""
    for fn in functions:
        for _ in range(warmup):  # Compiles the predict function.
            fn()
    # Buffers freed before (old kernels after a merge, training state) are
    # reclaimed now rather than in the middle of a timed call.
    gc.collect()
    samples = [[] for _ in functions]
    for i in range(runs):
        order = range(len(functions))
        for j in order if i % 2 == 0 else reversed(order):
            start = time.perf_counter()
            np.asarray(functions[j]())  # NumPy out: the call has finished.
            samples[j].append(round(time.perf_counter() - start, 4))
    return samples
