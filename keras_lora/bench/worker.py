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
             same size (torch; `keras_lora` imports Keras, which this run
             leaves unused).
    mixed-keras, mixed-peft
             the mixed-batch benchmark (`keras_lora.bench.mixed`): many
             adapters, every row of a batch its own, on Keras or PEFT.

The Keras runs are `keras_run.py`, the PEFT run `peft_run.py`; each is
imported only by the process that runs it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from keras_lora.files import atomic_write


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    started = time.perf_counter()
    try:
        if spec["run"] == "peft":
            from keras_lora.bench.peft_run import peft_run

            result = peft_run(spec)
        elif spec["run"] == "mixed-keras":
            from keras_lora.bench.mixed_keras import mixed_keras_run

            result = mixed_keras_run(spec)
        elif spec["run"] == "mixed-peft":
            from keras_lora.bench.mixed_peft import mixed_peft_run

            result = mixed_peft_run(spec)
        else:
            from keras_lora.bench.keras_run import keras_run

            result = keras_run(spec)
        result["status"] = "ok"
    except Exception as error:  # Reported in the table, not a crash.
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
    result.update(
        run=spec["run"],
        backend=spec["backend"],
        # The LoRA run's frozen base ("" and float32/none/none: plain).
        variant=spec.get("variant", ""),
        base_dtype=spec.get("base_dtype", "float32"),
        quantize=spec.get("quantize", "none"),
        remat=spec.get("remat", "none"),
        quantize_build=spec.get("quantize_build", "after"),
        loss=spec.get("loss", "dense"),
        wall_s=round(time.perf_counter() - started, 2),
        # Which keras_lora produced the numbers (an install or a checkout).
        keras_lora_path=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    atomic_write(spec["result_path"], json.dumps(result, indent=2).encode("utf-8"))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(
            "usage: python -m keras_lora.bench.worker SPEC.json "
            "(started by keras_lora.bench.engine)"
        )
    sys.exit(main(sys.argv[1]))
