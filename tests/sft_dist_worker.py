"""`keras-lora sft --distribution` on 8 virtual JAX CPU devices, as a
subprocess (XLA_FLAGS must name the device count before JAX starts).

Run as `python tests/sft_dist_worker.py MODEL_DIR DATA OUT_ROOT`: trains
the same tiny sft run on one device, with `--distribution data` and with
`--distribution model`, tries a batch that does not split over the
replicas, and prints one JSON line: each run's losses, and the error.
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

from keras_lora.recipes.sft.config import SftConfig  # noqa: E402
from keras_lora.recipes.sft.run import train  # noqa: E402


def run(model: str, data: str, out: str, **options) -> dict:
    config = SftConfig(
        model,
        data,
        out,
        **(
            {"steps": 3, "batch": 8, "learning_rate": 0.01, "generate_prompts": 0}
            | options
        ),
    )
    report = train(config)
    keys = ("train_loss", "eval_loss_before", "eval_loss_after")
    return {key: report[key] for key in keys} | {"settings": report["settings"]}


if __name__ == "__main__":
    model, data, root = sys.argv[1:4]
    result = {"devices": len(keras.distribution.list_devices())}
    for name in ("single", "data", "model"):
        options = {} if name == "single" else {"distribution": name}
        result[name] = run(model, data, os.path.join(root, name), **options)
    try:
        run(model, data, os.path.join(root, "bad"), distribution="data", batch=6)
    except ValueError as error:
        result["batch_error"] = str(error)
        result["bad_out_exists"] = os.path.exists(os.path.join(root, "bad"))
    print(json.dumps(result))
