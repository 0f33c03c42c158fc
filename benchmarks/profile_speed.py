"""Where a training step's time goes: keras-lora per backend against PEFT.

    python benchmarks/profile_speed.py --backend torch|jax|tensorflow|peft \\
        [--run floor|lora] [--dropout 0.1] [--autocast] [--tiny]

Builds the model `keras-lora compare` trains (GPT-2 base architecture,
random weights, batch 8 x 128, AdamW, rank 4 on query/value, compiled the
same way; `--backend peft` is its Hugging Face PEFT peer on torch), takes
warm-up steps, then profiles `--steps` steps and prints the time of each
kind of operation per step: the vocabulary projection, the loss over the
vocabulary, the block projections (attention and MLP matmuls), the LoRA
factors, the attention scores, dropout, layer norms, GELU, layout copies,
the optimizer, and the rest. torch (both the Keras torch backend and PEFT)
is read with `torch.profiler` (self time of each aten op, classified by its
name and input shapes); JAX with `jax.profiler` (each XLA op of the
compiled step, classified by the operations inside it); TensorFlow with
`tf.profiler` (each kernel, classified by its op type and the layer path
in its name; kernel names carry no shapes, so a LoRA run's factor matmuls
count as block projections there), read with xprof's converter (`pip install --no-deps
--target DIR xprof`, then PYTHONPATH=DIR: its other dependencies are not
needed for this). JAX and TensorFlow times are summed over their threads,
so they can add up to more than the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # This checkout's keras_lora, wherever it runs from.

from keras_lora.families import GPT2  # noqa: E402  (after the path is set)

CATEGORIES = (
    "vocabulary projection",
    "loss over the vocabulary",
    "block projections",
    "LoRA factors",
    "attention scores",
    "dropout",
    "layer norm",
    "GELU",
    "layout copies",
    "optimizer",
    "other",
)


def spec_for(args) -> dict:
    from keras_lora.recipes.models import architecture

    arch = architecture("tiny" if args.tiny else "base").backbone_config()
    return {
        "arch": arch,
        "preset": None,
        "run": args.run,
        "targets": list(GPT2.default_targets),
        "rank": 4,
        "alpha": 32.0,
        "learning_rate": 5e-5,
        "seed": 0,
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "dropout": args.dropout,
        "dtype_policy": "mixed_bfloat16" if args.autocast else None,
        # The whole model in bfloat16 (`inject_lora` keeps factors float32).
        "base_dtype": args.base_dtype,
    }


def batches(spec: dict):
    from keras_lora.bench.common import token_data

    tokens, labels = token_data(dict(spec, steps=spec["steps"] * 2 + 4))
    b = spec["batch"]
    return [
        (tokens[i * b : (i + 1) * b], labels[i * b : (i + 1) * b])
        for i in range(len(tokens) // b)
    ]


# --- torch: the Keras torch backend and PEFT, op by op ---------------------


def torch_category(name: str, shapes: list, spec: dict) -> str:
    vocab, seq, rank = spec["arch"]["vocabulary_size"], spec["seq"], spec["rank"]
    dims = [tuple(s) for s in shapes if isinstance(s, (list, tuple))]
    flat = {d for s in dims for d in s}
    square = any(len(s) >= 2 and s[-1] == seq and s[-2] == seq for s in dims)
    # A bmm batched over (batch x heads) is attention (Q·Kᵀ or P·V); the
    # projections' einsums reach torch as a bmm with a batch of 1.
    per_head = name.endswith("bmm") and bool(dims) and dims[0][:1] > (1,)
    if "adam" in name or "foreach" in name or "norm" in name and "layer" not in name:
        return "optimizer"
    if name in (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::matmul",
    ):
        if vocab in flat:
            return "vocabulary projection"
        if square or per_head:
            return "attention scores"
        if rank in flat:
            return "LoRA factors"
        return "block projections"
    if "log_softmax" in name or "nll_loss" in name or "cross_entropy" in name:
        return "loss over the vocabulary"
    if "bernoulli" in name or "dropout" in name:
        return "dropout"
    if "layer_norm" in name:
        return "layer norm"
    if "gelu" in name or "tanh" in name or "pow" in name:
        return "GELU"
    if "scaled_dot_product" in name or "softmax" in name or square:
        return "attention scores"
    if vocab in flat:
        return "loss over the vocabulary"  # Copies and fills of the logits.
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat"):
        return "layout copies"
    return "other"


def profile_torch(spec: dict, keras_backend: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    if keras_backend:
        step = keras_train_on_batch(keras_lm(spec), batches(spec))
    else:
        from keras_lora.bench import peft_run

        data = batches(spec)

        torch.manual_seed(spec["seed"])
        model = peft_run.peft_model(spec, "cpu")
        train_step = peft_run.peft_train_step(model, spec, "cpu")

        def step(i):
            tokens, labels = data[i]
            return train_step(
                torch.from_numpy(tokens.astype("int64")),
                torch.from_numpy(labels.astype("int64")),
            )

    times = timed_steps(step, spec)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(spec["steps"]):
            step(spec["warmup"] + spec["steps"] + i)
    seconds, ops = collections.Counter(), collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        category = torch_category(event.key, event.input_shapes, spec)
        share = event.self_cpu_time_total / 1e6 / spec["steps"]
        seconds[category] += share
        ops[(category, f"{event.key} {event.input_shapes}"[:120])] += share
    return {"median_step_s": statistics.median(times), "seconds": seconds, "ops": ops}


def keras_lm(spec: dict):
    """The benchmark's Keras model for the spec's run, compiled as
    `keras-lora compare` compiles it, under `--autocast` or `--base-dtype`."""
    import keras

    from keras_lora.bench import keras_run

    keras.utils.set_random_seed(spec["seed"])
    keras_run.set_dtype_policies(spec)
    lm = keras_run.build_lm(spec)
    keras_run.prepare_run(lm, spec["run"], spec)
    return lm


def keras_train_on_batch(lm, data: list):
    """`step(i)`: `fit`'s train step on batch `i` (`train_on_batch`)."""

    def step(i):
        tokens, labels = data[i]
        x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
        return lm.train_on_batch(x, labels)

    return step


def timed_steps(step, spec: dict) -> list[float]:
    for i in range(spec["warmup"]):
        step(i)
    times = []
    for i in range(spec["steps"]):
        start = time.perf_counter()
        step(spec["warmup"] + i)
        times.append(time.perf_counter() - start)
    return times


# --- JAX: the compiled step, XLA op by XLA op ------------------------------

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)*?) (\S+?)\(")


def hlo_index(text: str) -> tuple[dict, dict]:
    """Each instruction's (opcode, result shape, called computation) and
    each computation's instructions, from XLA's optimized HLO text."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            computations[current] = []
            continue
        match = INSTRUCTION.match(line)
        if match and current is not None:
            name, shape, opcode = match.groups()
            called = re.findall(r"(?:calls|body|to_apply)=%?([\w.\-]+)", line)
            instructions[name] = (opcode, shape, called, line)
            computations[current].append(name)
    return instructions, computations


def hlo_category(name: str, instructions: dict, computations: dict, spec) -> str:
    vocab, seq, rank = spec["arch"]["vocabulary_size"], spec["seq"], spec["rank"]
    inside = fused_ops(name, instructions, computations)
    opcodes = {instructions[i][0] for i in inside}
    text = " ".join(instructions[i][3] for i in inside)
    dims = {
        int(d) for d in re.findall(r"\d+", " ".join(re.findall(r"\[[\d,]*\]", text)))
    }
    square = f"{seq},{seq}]" in text
    if "rng-bit-generator" in opcodes or (
        "shift-right-logical" in opcodes and "u32" in text and "xor" in opcodes
    ):
        return "dropout"
    if opcodes & {"dot", "convolution"} or "matmul" in text or "ynn" in name:
        if vocab in dims:
            return "vocabulary projection"
        if square:
            return "attention scores"
        if re.search(rf"[\[,]{rank}[\],]", text):
            return "LoRA factors"
        return "block projections"
    if vocab in dims:
        return "loss over the vocabulary"
    if square:
        return "attention scores"
    if "rsqrt" in opcodes:
        return "layer norm"
    if "tanh" in opcodes:
        return "GELU"
    if opcodes <= {"copy", "transpose", "bitcast", "parameter", "slice", "concatenate"}:
        return "layout copies"
    if "sqrt" in opcodes and "divide" in opcodes:
        return "optimizer"
    return "other"


def profile_jax(spec: dict) -> dict:
    import jax

    lm = keras_lm(spec)
    data = batches(spec)

    def batch(i):
        tokens, labels = data[i]
        return (
            {"token_ids": tokens, "padding_mask": np.ones_like(tokens)},
            labels,
            None,
        )

    lm._symbolic_build(data_batch=batch(0))  # Builds the optimizer's state.
    state = [lm._get_jax_state(True, True, True, True)]
    compiled = jax.jit(lm.train_step).lower(state[0], batch(0)).compile()
    instructions, computations = hlo_index(compiled.as_text())

    def step(i):
        logs, state[0] = compiled(state[0], batch(i))
        jax.block_until_ready(logs)

    times = timed_steps(step, spec)
    seconds = collections.Counter()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for i in range(spec["steps"]):
                step(spec["warmup"] + spec["steps"] + i)
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    ops = collections.Counter()
    for event in events:
        op = event.get("args", {}).get("hlo_op")
        if event.get("ph") == "X" and op and not event["name"].startswith("end:"):
            category = hlo_category(op, instructions, computations, spec)
            share = event["dur"] / 1e6 / spec["steps"]
            seconds[category] += share
            opcodes = sorted(
                {instructions[i][0] for i in fused_ops(op, instructions, computations)}
            )
            ops[(category, f"{op} {','.join(opcodes)}"[:120])] += share
    return {"median_step_s": statistics.median(times), "seconds": seconds, "ops": ops}


def fused_ops(name: str, instructions: dict, computations: dict) -> set:
    """`name` and every instruction of the computations it calls."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in instructions:
            continue
        seen.add(current)
        for computation in instructions[current][2]:
            todo.extend(computations.get(computation, []))
    return seen


# --- TensorFlow: each kernel of the step's graph --------------------------


def tf_category(op_type: str, long_name: str) -> str:
    # Grappler's rewrites add "ArithmeticOptimizer" to kernel names.
    path = long_name.lower().replace("arithmeticoptimizer", "")
    if op_type.startswith("StatelessRandom") or "dropout" in path:
        return "dropout"
    if "compile_loss" in path or "crossentropy" in op_type.lower():
        return "loss over the vocabulary"
    if "adam" in path or "optimizer" in path or "clip" in path:
        return "optimizer"
    if "matmul" in op_type.lower() or "einsum" in op_type.lower():
        if GPT2.embedding in path:
            return "vocabulary projection"
        projections = (p.path.rsplit("/", 1)[-1] for p in GPT2.projections)
        if any(f"/{name}" in path for name in projections):
            return "block projections"
        # Inside self_attention but no projection: Q·Kᵀ or P·V.
        return "attention scores" if "attention" in path else "block projections"
    if (
        "softmax" in op_type.lower()
        or "self_attention" in path
        and (op_type in ("SelectV2", "Greater", "Minimum", "Mul", "Max", "Sum"))
    ):
        return "attention scores"
    if "layer_norm" in path or "layernorm" in path:
        return "layer norm"
    if "gelu" in path or op_type in ("Tanh", "TanhGrad", "Pow"):
        return "GELU"
    if "Transpose" in op_type or op_type in ("ConcatV2", "Identity"):
        return "layout copies"
    return "other"


def profile_tensorflow(spec: dict) -> dict:
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        sys.exit(
            "error: TensorFlow profiles are read with xprof's converter: "
            "pip install --no-deps --target DIR xprof, then PYTHONPATH=DIR"
        )
    import tensorflow as tf

    step = keras_train_on_batch(keras_lm(spec), batches(spec))
    times = timed_steps(step, spec)
    seconds = collections.Counter()
    with tempfile.TemporaryDirectory() as trace_dir:
        tf.profiler.experimental.start(trace_dir)
        for i in range(spec["steps"]):
            step(spec["warmup"] + spec["steps"] + i)
        tf.profiler.experimental.stop()
        paths = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        trace, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    ops = collections.Counter()
    for event in json.loads(trace)["traceEvents"]:
        long_name = event.get("args", {}).get("long_name", "")
        if event.get("ph") == "X" and ":" in long_name:
            category = tf_category(event["name"], long_name)
            share = event["dur"] / 1e6 / spec["steps"]
            seconds[category] += share
            layer = re.sub(r"transformer_layer_\d+", "transformer_layer_N", long_name)
            ops[(category, layer[-120:])] += share
    return {"median_step_s": statistics.median(times), "seconds": seconds, "ops": ops}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=("torch", "jax", "tensorflow", "peft"), required=True
    )
    parser.add_argument("--run", choices=("floor", "lora"), default="floor")
    parser.add_argument("--dropout", type=float, help="model dropout (GPT-2: 0.1)")
    parser.add_argument("--autocast", action="store_true", help="mixed_bfloat16")
    parser.add_argument(
        "--base-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the Keras model's whole dtype (a bfloat16 frozen base)",
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="slowest ops listed")
    args = parser.parse_args()
    if args.backend != "peft":
        os.environ["KERAS_BACKEND"] = args.backend
    spec = spec_for(args)
    if args.backend == "jax":
        result = profile_jax(spec)
    elif args.backend == "tensorflow":
        result = profile_tensorflow(spec)
    else:
        result = profile_torch(spec, keras_backend=args.backend == "torch")
    seconds = result["seconds"]
    total = sum(seconds.values())
    name = "HF PEFT (torch)" if args.backend == "peft" else f"keras {args.backend}"
    print(
        f"{name}, {args.run if args.backend != 'peft' else 'lora'} run, "
        f"dropout {args.dropout if args.dropout is not None else 'default'}"
        f"{', bfloat16 autocast' if args.autocast else ''}"
        f"{', bfloat16 base' if args.base_dtype != 'float32' else ''}: median step "
        f"{result['median_step_s']:.3f} s (unprofiled), op time {total:.3f} s/step"
    )
    for category in CATEGORIES:
        share = seconds.get(category, 0.0)
        print(f"  {category:26s} {share * 1000:8.0f} ms  {100 * share / total:5.1f}%")
    print(f"  slowest {args.top} ops (ms per step):")
    for (category, op), share in result.pop("ops").most_common(args.top):
        print(f"  {share * 1000:8.1f}  {category:24s} {op}")
    print("JSON " + json.dumps({"name": name, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
