"""One benchmark run, in its own process.

    python -m keras_lora.bench.worker SPEC.json

`keras_lora.bench.engine` starts this module once per (backend, run) with
`KERAS_BACKEND` set, because Keras fixes its backend at import and because a
run's peak memory must not include another run's. The spec (JSON) says what
to run; the result (JSON) goes to `spec["result_path"]`.

Runs:
    full     every weight trains.
    lora     keras_lora.inject_lora(rank, alpha, targets).
    builtin  keras-hub's `backbone.enable_lora(rank, target_layer_names)`.
    floor    every weight frozen except one bias vector in the first
             transformer block: the cost of a forward pass plus
             back-propagation down to block 0, which any adapter there pays.
    peft     Hugging Face PEFT LoRA on a transformers GPT2LMHeadModel of the
             same size (torch, no Keras).
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np

from keras_lora.callbacks import host_peak_rss_bytes, reset_host_peak_rss
from keras_lora.families import GPT2
from keras_lora.files import atomic_write


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    started = time.perf_counter()
    try:
        if spec["run"] == "peft":
            result = peft_run(spec)
        else:
            result = keras_run(spec)
        result["status"] = "ok"
    except Exception as error:  # Reported in the table, not a crash.
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
    result.update(
        run=spec["run"],
        backend=spec["backend"],
        wall_s=round(time.perf_counter() - started, 2),
        # Which keras_lora produced the numbers (an install or a checkout).
        keras_lora_path=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    atomic_write(spec["result_path"], json.dumps(result, indent=2).encode("utf-8"))
    return 0 if result["status"] == "ok" else 1


# ----------------------------------------------------------------- data


def token_data(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Training data: inputs (n, seq) and next-token labels (n, seq).

    Rows of `spec["tokens_path"]` (a .npy of shape (rows, seq + 1), e.g.
    tokenized text; checked by the engine) when given, else random ids.
    """
    n = (spec["warmup"] + spec["steps"]) * spec["batch"]
    return _split(_token_rows(spec)[:n])


def eval_data(spec: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """Held-out rows (the last `eval_batches` batches), never trained on."""
    n = spec.get("eval_batches", 0) * spec["batch"]
    return _split(_token_rows(spec)[-n:]) if n else None


def _token_rows(spec: dict) -> np.ndarray:
    if spec.get("tokens_path"):
        return np.load(spec["tokens_path"]).astype("int32")
    batches = spec["warmup"] + spec["steps"] + spec.get("eval_batches", 0)
    rng = np.random.default_rng(spec["seed"])
    vocab = spec["arch"]["vocabulary_size"]
    shape = (batches * spec["batch"], spec["seq"] + 1)
    return rng.integers(0, vocab, shape).astype("int32")


def _split(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return rows[:, :-1], rows[:, 1:]


def step_stats(step_times: list[float], cpu_times: list[float], spec: dict) -> dict:
    """Median wall time per step after warm-up, and tokens/s from it.

    Also the median process CPU time per step (all threads): on a shared
    machine, other processes stretch wall time far more than CPU time, so
    it shows whether a wall-time difference is the run's own work. The load
    average says how busy the machine was.
    """
    measured = step_times[spec["warmup"] :]
    median = statistics.median(measured)
    return {
        "step_times_s": [round(t, 4) for t in step_times],
        "median_step_s": round(median, 4),
        "tokens_per_s": round(spec["batch"] * spec["seq"] / median, 1),
        "median_step_cpu_s": round(statistics.median(cpu_times[spec["warmup"] :]), 4),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


# ------------------------------------------------------------ keras runs


def keras_run(spec: dict) -> dict:
    import keras

    import keras_lora
    from keras_lora.callbacks import GPUMemoryCallback
    from keras_lora.recipes.training import StepLog

    keras.utils.set_random_seed(spec["seed"])
    if spec["dtype_policy"]:
        keras.config.set_dtype_policy(spec["dtype_policy"])

    t0 = time.perf_counter()
    lm = build_lm(spec)
    build_s = time.perf_counter() - t0
    tokens, labels = token_data(spec)
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}

    run = spec["run"]
    prepare_run(lm, run, spec)
    trainable = sum(math.prod(v.shape) for v in lm.trainable_weights)
    frozen = sum(math.prod(v.shape) for v in lm.non_trainable_weights)

    timer = StepLog()
    memory = GPUMemoryCallback(target_batches=[spec["warmup"]])
    build_peak = host_peak_rss_bytes()
    lm.fit(
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
        result["process_peak_rss_gb"] = round(
            max(build_peak, host_peak_rss_bytes()) / 2**30, 3
        )
    result.update(step_stats(timer.step_times, timer.cpu_times, spec))
    result.update(adapter_size(lm, spec, keras_lora))
    if run == "lora":
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
    lm.compile(optimizer=optimizer, loss=loss)


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
    import keras_hub

    if spec["preset"]:
        backbone = keras_hub.models.GPT2Backbone.from_preset(spec["preset"])
    else:
        backbone = keras_hub.models.GPT2Backbone(**spec["arch"])
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


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


def file_bytes(directory: str) -> dict:
    weights = total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            size = os.path.getsize(os.path.join(root, name))
            total += size
            if not name.endswith(".json"):
                weights += size
    return {"adapter_bytes": weights, "adapter_files_bytes": total}


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


# --------------------------------------------------------------- PEFT run


def peft_run(spec: dict) -> dict:
    import peft
    import torch
    import transformers

    torch.manual_seed(spec["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch = spec["arch"]
    config = transformers.GPT2Config(
        vocab_size=arch["vocabulary_size"],
        n_positions=arch["max_sequence_length"],
        n_embd=arch["hidden_dim"],
        n_layer=arch["num_layers"],
        n_head=arch["num_heads"],
        n_inner=arch["intermediate_dim"],
    )
    t0 = time.perf_counter()
    model = transformers.GPT2LMHeadModel(config)  # Random weights.
    modules = peft_target_modules(spec["targets"])
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=spec["rank"],
            lora_alpha=spec["alpha"],
            lora_dropout=0.0,
            target_modules=modules,
            fan_in_fan_out=True,  # GPT-2's Conv1D keeps weights (in, out).
            bias="none",
        ),
    )
    model.to(device).train()
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = torch.optim.AdamW(
        params, lr=spec["learning_rate"], weight_decay=0.01, eps=1e-6
    )
    autocast_dtype = {
        "mixed_float16": torch.float16,
        "mixed_bfloat16": torch.bfloat16,
    }.get(spec["dtype_policy"] or "")
    scaler = torch.amp.GradScaler(device, enabled=autocast_dtype == torch.float16)

    tokens, labels = token_data(spec)
    tokens = torch.from_numpy(tokens.astype("int64"))
    labels = torch.from_numpy(labels.astype("int64"))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        memory_device = "cuda:0"
    else:
        _reset_host_peak()
        memory_device = "host RSS"

    step_times, cpu_times, losses = [], [], []
    b = spec["batch"]
    for step in range(spec["warmup"] + spec["steps"]):
        ids = tokens[step * b : (step + 1) * b].to(device)
        target = labels[step * b : (step + 1) * b].to(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast(
            device, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
        ):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1)
        )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # global_clipnorm=1.0
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # Waits for the step on an accelerator.
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    eval_loss = None
    held_out = eval_data(spec)
    if held_out is not None:
        model.eval()
        eval_losses = []
        with torch.no_grad():
            for start in range(0, len(held_out[0]), b):
                ids, target = (
                    torch.from_numpy(a[start : start + b].astype("int64")).to(device)
                    for a in held_out
                )
                logits = model(input_ids=ids).logits.float()
                eval_losses.append(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
                    ).item()
                )
        eval_loss = round(statistics.fmean(eval_losses), 4)

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = host_peak_rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sizes = file_bytes(tmp)
    result = {
        "trainable_params": int(trainable),
        "frozen_params": int(frozen),
        "peft_target_modules": modules,
        "build_s": round(build_s, 2),
        "memory_device": memory_device,
        "peak_memory_gb": round(peak / 2**30, 3),
        "final_loss": round(losses[-1], 4),
        "mean_loss": round(statistics.fmean(losses), 4),
        "eval_loss": eval_loss,
        "torch_threads": torch.get_num_threads(),
        **sizes,
        "adapter_source": "PeftModel.save_pretrained (safetensors)",
    }
    result.update(step_stats(step_times, cpu_times, spec))
    return result


def peft_target_modules(roles) -> list[str]:
    """PEFT `target_modules` for keras-lora target roles.

    Full Hugging Face module names below a block ("attn.c_attn"): PEFT
    matches a target against the end of each module's dotted name, so these
    pick exactly the family's modules. A fused module (query|key|value in
    one) is adapted whole, whichever of its roles was asked for.
    """
    return sorted({GPT2.projection(role).hf_module for role in roles})


def _reset_host_peak() -> None:
    try:
        reset_host_peak_rss()
    except OSError:
        pass  # Not Linux: the peak then covers the whole process.


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(
            "usage: python -m keras_lora.bench.worker SPEC.json "
            "(started by keras_lora.bench.engine)"
        )
    sys.exit(main(sys.argv[1]))
