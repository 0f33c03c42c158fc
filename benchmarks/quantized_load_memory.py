"""Peak host memory of loading a Hugging Face directory quantized, two ways,
each in its own process per Keras backend:

- `float_then_quantize`: keras-hub's `CausalLM.from_preset` (float), then
  `model.quantize(mode)`: the whole float model exists for a moment;
- `built_quantized`: `keras_lora.interop.quantized_load.load_quantized_causal_lm`,
  what `keras-lora sft --quantize` does with a Hugging Face directory: the
  projections are built int8/int4 and filled tensor by tensor.

Reports each process's peak resident memory (`VmHWM`), its resident memory
after the imports, and the peak minus that: the load's own high-water mark.

    python benchmarks/quantized_load_memory.py MODEL_DIR --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WAYS = ("float_then_quantize", "built_quantized")


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(model_dir: str, way: str, mode: str) -> dict:
    import warnings

    import keras_hub

    from keras_lora.interop.quantized_load import load_quantized_causal_lm

    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    if way == "float_then_quantize":
        lm = keras_hub.models.CausalLM.from_preset(model_dir, preprocessor=None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Layer .* does not have a `quantize`")
            lm.quantize(mode)
    else:
        lm = load_quantized_causal_lm(model_dir, mode)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {
        "rss_after_imports_mb": round(baseline, 1),
        "peak_rss_mb": round(peak, 1),
        "load_increment_mb": round(peak - baseline, 1),
        "rss_after_load_mb": round(_status_mb("VmRSS"), 1),
        "seconds": round(seconds, 1),
        "parameters": int(lm.count_params()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", nargs="+", default=["int8", "int4"])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"])
    parser.add_argument(
        "--child", nargs=2, metavar=("WAY", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model_dir, *args.child)))
        return 0
    rows = []
    for backend in args.backends:
        for mode in args.modes:
            for way in WAYS:
                env = dict(os.environ, KERAS_BACKEND=backend)
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        args.model_dir,
                        "--out",
                        args.out,
                        "--child",
                        way,
                        mode,
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(backend=backend, mode=mode, way=way)
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quantized_load.json"), "w") as f:
        json.dump(
            {"model_dir": os.path.abspath(args.model_dir), "rows": rows}, f, indent=1
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
