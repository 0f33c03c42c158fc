"""The mixed-batch benchmark run on one Keras backend.

`mixed_keras_run(spec)` builds the GPT-2 of the spec twice: once with
`spec["adapters"]` adapters (rank `spec["rank"]` on `spec["targets"]`,
random B so that each adapter changes the outputs), once with a single
adapter (its plain path: the fastest single-adapter model). It times, with
the calls alternated ABBA-style so drift hits every variant alike:

- forward (`predict_on_batch` of batch x seq) and `generate` of
  `spec["new_tokens"]` tokens after a seq-token prompt, for
  `lone` (the one-adapter model), `single` (the many-adapter model with
  one active adapter, `set_adapter`) and `mixed` (`adapter_batch`: every
  row its own adapter);
- switching: the first `generate` right after `set_adapter` to another
  adapter, against a repeat of the previous `generate`.
"""

from __future__ import annotations

import gc
import statistics
import time

import numpy as np

from keras_lora.bench.keras_run import build_lm


def mixed_keras_run(spec: dict) -> dict:
    import keras

    import keras_lora

    keras.utils.set_random_seed(spec["seed"])
    names = [f"adapter_{i}" for i in range(spec["adapters"])]
    rows = [names[i % len(names)] for i in range(spec["batch"])]
    t0 = time.perf_counter()
    many = build_lm(spec)
    for name in names:
        keras_lora.inject_lora(
            many,
            rank=spec["rank"],
            alpha=spec["alpha"],
            targets=spec["targets"],
            adapter_name=name,
        )
    randomize_b(many, keras_lora, spec["seed"])
    keras_lora.set_adapter(many, names[0])
    lone = build_lm(spec)
    keras_lora.inject_lora(
        lone, rank=spec["rank"], alpha=spec["alpha"], targets=spec["targets"]
    )
    for model in (many, lone):
        model.compile(sampler="greedy")
    build_s = time.perf_counter() - t0

    rng = np.random.default_rng(spec["seed"])
    vocab, seq, batch = spec["arch"]["vocabulary_size"], spec["seq"], spec["batch"]
    tokens = rng.integers(0, vocab, (batch, seq)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    total = seq + spec["new_tokens"]
    prompt = {
        "token_ids": np.pad(tokens, ((0, 0), (0, spec["new_tokens"]))),
        "padding_mask": np.pad(x["padding_mask"], ((0, 0), (0, spec["new_tokens"]))),
    }
    assert prompt["token_ids"].shape == (batch, total)

    def predict(model):
        return lambda: np.asarray(model.predict_on_batch(x))

    def generate(model):
        def run():
            out = model.generate(prompt, stop_token_ids=None)
            return np.asarray(out["token_ids"])

        return run

    def mixed(fn):
        def run():
            with keras_lora.adapter_batch(many, rows):
                return fn()

        return run

    result = {"build_s": round(build_s, 2), "rows": rows}
    for task, make, repeats in (
        ("forward", predict, spec["repeats"]),
        ("generate", generate, spec["generate_repeats"]),
    ):
        variants = {
            "lone": make(lone),
            "single": make(many),
            "mixed": mixed(make(many)),
        }
        first = {}
        for label, fn in variants.items():  # Traces and compiles each.
            start = time.perf_counter()
            fn()
            first[label] = round(time.perf_counter() - start, 3)
        for fn in variants.values():  # Steady state (JAX re-traces once).
            fn()
        samples = alternate(list(variants.values()), repeats)
        for label, times in zip(variants, samples, strict=True):
            result[f"{task}_{label}_s"] = round(statistics.median(times), 4)
            result[f"{task}_{label}_samples_s"] = times
            result[f"{task}_{label}_first_call_s"] = first[label]
        tokens_per_call = batch * (seq if task == "forward" else spec["new_tokens"])
        for label in variants:
            result[f"{task}_{label}_tokens_per_s"] = round(
                tokens_per_call / result[f"{task}_{label}_s"], 1
            )
    check_rows(many, lone, x, rows, keras_lora, result)
    result.update(switch_cost(many, names, generate(many), spec, keras_lora))
    return result


def randomize_b(model, keras_lora, seed: int) -> None:
    """Non-zero B factors, as training would leave them: each adapter then
    changes the outputs, so a wrong row choice would show."""
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model):
        for name in layer.adapters.names:
            b = layer.adapters[name].lora_b
            b.assign(rng.normal(0, 0.02, b.shape).astype("float32"))


def check_rows(many, lone, x, rows, keras_lora, result) -> None:
    """The mixed batch's rows against each adapter alone (max |diff|)."""
    with keras_lora.adapter_batch(many, rows):
        mixed = np.asarray(many.predict_on_batch(x))
    worst = 0.0
    for name in dict.fromkeys(rows):
        keras_lora.set_adapter(many, name)
        alone = np.asarray(many.predict_on_batch(x))
        picked = [i for i, n in enumerate(rows) if n == name]
        worst = max(worst, float(np.max(np.abs(mixed[picked] - alone[picked]))))
    keras_lora.set_adapter(many, rows[0])
    result["mixed_vs_single_max_abs_diff"] = worst


def switch_cost(many, names, generate, spec, keras_lora) -> dict:
    """`generate` right after `set_adapter` (to an adapter never active
    before in a traced step's life) against a repeat of the last one."""
    repeat, after_switch = [], []
    keras_lora.set_adapter(many, names[0])
    generate()  # Warm.
    for name in names[1 : 1 + spec["switches"]]:
        start = time.perf_counter()
        generate()
        repeat.append(round(time.perf_counter() - start, 4))
        keras_lora.set_adapter(many, name)
        start = time.perf_counter()
        generate()
        after_switch.append(round(time.perf_counter() - start, 4))
    return {
        "generate_repeat_s": round(statistics.median(repeat), 4),
        "generate_after_switch_s": round(statistics.median(after_switch), 4),
        "generate_repeat_samples_s": repeat,
        "generate_after_switch_samples_s": after_switch,
    }


def alternate(functions, runs: int) -> list[list[float]]:
    """Seconds per call of each function, in ABC CBA order."""
    gc.collect()
    samples = [[] for _ in functions]
    for i in range(runs):
        order = range(len(functions))
        for j in order if i % 2 == 0 else reversed(order):
            start = time.perf_counter()
            functions[j]()
            samples[j].append(round(time.perf_counter() - start, 4))
    return samples
