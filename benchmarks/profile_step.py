"""What one train step costs, per run, from XLA's own analysis (JAX only).

    KERAS_BACKEND=jax python benchmarks/profile_step.py [--tiny] [--targets all]

For each run (full, lora, builtin, floor) this compiles the same jitted train
step that `model.fit` runs, without executing it, and prints XLA's memory
analysis (bytes of arguments — weights, optimizer state, data —, of
temporaries — activations and gradients —, and of outputs) and its cost
analysis (floating-point operations). It explains the benchmark's step times
and peak memory: a LoRA step cannot cost less than the floor's forward pass
plus back-propagation to the first block.
"""

from __future__ import annotations

import argparse
import os
import sys

from keras_lora.bench import common, keras_run
from keras_lora.families import GPT2
from keras_lora.recipes.models import architecture


def profile(run: str, spec: dict) -> dict:
    import keras

    keras.utils.set_random_seed(spec["seed"])
    lm = keras_run.build_lm(spec)
    keras_run.prepare_run(lm, run, spec)
    tokens, labels = common.token_data(dict(spec, steps=1, warmup=0))
    data = ({"token_ids": tokens, "padding_mask": tokens * 0 + 1}, labels, None)
    lm._symbolic_build(data_batch=data)  # Builds the optimizer and metrics.
    compiled = keras_run.compiled_train_step(lm, data)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "run": run,
        "trainable": sum(int(v.numpy().size) for v in lm.trainable_variables),
        "arguments_gb": memory.argument_size_in_bytes / 2**30,
        "temporaries_gb": memory.temp_size_in_bytes / 2**30,
        "outputs_gb": memory.output_size_in_bytes / 2**30,
        "gflops": cost.get("flops", float("nan")) / 1e9,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", nargs="+", default=list(GPT2.default_targets))
    parser.add_argument(
        "--runs", nargs="+", default=["full", "lora", "builtin", "floor"]
    )
    args = parser.parse_args()
    if os.environ.get("KERAS_BACKEND") != "jax":
        sys.exit("error: run with KERAS_BACKEND=jax (uses XLA's analyses)")
    targets = list(GPT2.roles) if args.targets == ["all"] else args.targets
    arch = architecture("tiny" if args.tiny else "base").backbone_config()
    spec = dict(
        arch=arch,
        preset=None,
        batch=args.batch,
        seq=args.seq,
        rank=args.rank,
        alpha=32.0,
        targets=targets,
        seed=0,
        learning_rate=5e-5,
    )
    print(
        f"GPT-2 {'tiny' if args.tiny else 'base'} architecture, RANDOM weights; "
        f"batch {args.batch} x {args.seq}; LoRA targets {', '.join(targets)}"
    )
    print(
        f"{'run':8s} {'trainable':>12s} {'arguments GB':>13s} "
        f"{'temporaries GB':>15s} {'outputs GB':>11s} {'GFLOP':>9s}"
    )
    for run in args.runs:
        r = profile(run, spec)
        print(
            f"{r['run']:8s} {r['trainable']:12,d} {r['arguments_gb']:13.3f} "
            f"{r['temporaries_gb']:15.3f} {r['outputs_gb']:11.3f} {r['gflops']:9.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
