"""How much one LoRA train step's memory grows per transformer block, with
and without `keras_lora.remat_layers`: what block remat actually saves.

    python benchmarks/remat_probe.py --backend jax
    python benchmarks/remat_probe.py --backend tensorflow [--jit-compile]

GPT-2 base widths (hidden 768, 12 heads, vocabulary 50257; `--tiny`:
hidden 64, 4 heads, vocabulary 256), 2 and 4 blocks, LoRA rank 4 on
query/value, batch 8 x 128 (`--tiny`: 4 x 64), Adam. JAX: XLA's
temporaries for the compiled step (`memory_analysis()`, not run).
TensorFlow: the peak of TF's CPU allocator over one `train_on_batch`
after a warm-up step. The growth from 2 to 4 blocks, halved, is what one
more block keeps alive. On JAX it also counts the compiled step's HLO
instructions per block: the executable, which stays in host memory while
the step is in use, grows with them. `--json` prints the bytes (and the
counts) as one JSON line (tests/test_remat_layers.py reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # This checkout's keras_lora, wherever it runs from.

# The probe's own small widths (smaller than `--arch tiny`'s vocabulary,
# more heads), so a test compiles it in seconds.
TINY = dict(
    vocabulary_size=256,
    num_heads=4,
    hidden_dim=64,
    intermediate_dim=256,
    max_sequence_length=64,
)


def step_bytes(num_layers: int, remat: bool, args) -> tuple[int, int | None]:
    """The step's memory in bytes, and (JAX) its compiled instructions."""
    import keras
    import keras_hub
    import numpy as np

    from keras_lora import inject_lora, remat_layers
    from keras_lora.bench.keras_run import compiled_train_step
    from keras_lora.families import GPT2
    from keras_lora.recipes.models import architecture

    if args.tiny:
        widths = TINY
    else:  # GPT-2 base's widths; the depth is the probe's.
        widths = architecture("base").backbone_config()
        del widths["num_layers"]
    batch, seq = (4, 64) if args.tiny else (8, 128)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        num_layers=num_layers,
        dropout=args.dropout,
        **widths,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    inject_lora(lm, rank=4, alpha=32.0, targets=list(GPT2.default_targets))
    if remat:
        remat_layers(backbone.transformer_layers)
    lm.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        jit_compile=args.jit_compile or args.backend == "jax",
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, widths["vocabulary_size"], (batch, seq)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    if args.backend == "jax":
        data = (x, tokens, None)
        lm._symbolic_build(data_batch=data)  # Builds the optimizer's variables.
        compiled = compiled_train_step(lm, data)
        instructions = compiled.as_text().count(" = ")
        return compiled.memory_analysis().temp_size_in_bytes, instructions
    import tensorflow as tf

    lm.train_on_batch(x, tokens)  # Traces and warms up.
    tf.config.experimental.reset_memory_stats("CPU:0")
    start = tf.config.experimental.get_memory_info("CPU:0")["current"]
    lm.train_on_batch(x, tokens)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - start, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("jax", "tensorflow"), required=True)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--jit-compile", action="store_true", help="TensorFlow: compile with XLA"
    )
    parser.add_argument("--tiny", action="store_true", help="small widths (tests)")
    parser.add_argument(
        "--json",
        action="store_true",
        help='one line: {"none": [b2, b4], "blocks": [...], "instructions": {...}}',
    )
    args = parser.parse_args()
    if os.environ.get("KERAS_BACKEND", args.backend) != args.backend:
        sys.exit(f"error: KERAS_BACKEND is not {args.backend}")
    os.environ["KERAS_BACKEND"] = args.backend
    measured = {
        "blocks" if remat else "none": [step_bytes(n, remat, args) for n in (2, 4)]
        for remat in (False, True)
    }
    result = {name: [int(b) for b, _ in runs] for name, runs in measured.items()}
    if args.backend == "jax":
        result["instructions"] = {
            name: [n for _, n in runs] for name, runs in measured.items()
        }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{'remat':8s} {'2 blocks MB':>12s} {'4 blocks MB':>12s} {'per block MB':>13s}"
    )
    for name in ("none", "blocks"):
        two, four = (b / 2**20 for b in result[name])
        print(f"{name:8s} {two:12.1f} {four:12.1f} {(four - two) / 2:13.1f}")
    for name, (two, four) in result.get("instructions", {}).items():
        print(
            f"{name:8s} HLO instructions: {two}, {four}; {(four - two) // 2} per block"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
