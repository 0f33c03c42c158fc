"""What both kinds of benchmark run share: the token data and step statistics.

The data comes from the spec (`keras_lora.bench.engine` writes it), so
every run of one comparison trains on the same rows.
"""

from __future__ import annotations

import os
import statistics

import numpy as np


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


def file_bytes(directory: str) -> dict:
    """Bytes of the weight files (not .json) and of all files under `directory`."""
    weights = total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            size = os.path.getsize(os.path.join(root, name))
            total += size
            if not name.endswith(".json"):
                weights += size
    return {"adapter_bytes": weights, "adapter_files_bytes": total}


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (`VmRSS`, Linux), or None.

    The worker reads it after its imports and before building the model:
    the peak minus this is what the run itself (model, training) added.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # Reported in kB.
    except OSError:
        pass
    return None
