"""The mixed-batch benchmark's outside peer: PEFT on a transformers GPT-2.

The same architecture (random weights), adapters, batch and prompt as
`keras_lora.bench.mixed_keras`, timed the same way: `single` is one active
adapter (`set_adapter`), `mixed` passes `adapter_names=` (PEFT groups the
rows by adapter and loops over the groups in Python), `lone` is a model
holding one adapter. transformers fuses GPT-2's query|key|value into one
module, which PEFT adapts whole where keras-lora adapts query and value
only.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from keras_lora.bench.mixed_keras import alternate
from keras_lora.bench.peft_run import gpt2_config, lora_config
from keras_lora.optional import require


def mixed_peft_run(spec: dict) -> dict:
    peft = require("peft", extra="hf")
    torch = require("torch", extra="torch")
    transformers = require("transformers", extra="hf")

    torch.manual_seed(spec["seed"])
    arch = spec["arch"]
    config = gpt2_config(arch)
    # Random B: each adapter changes the outputs.
    lora = lora_config(spec, init_lora_weights=False)
    names = [f"adapter_{i}" for i in range(spec["adapters"])]
    rows = [names[i % len(names)] for i in range(spec["batch"])]
    t0 = time.perf_counter()
    many = peft.get_peft_model(
        transformers.GPT2LMHeadModel(config), lora, adapter_name=names[0]
    )
    for name in names[1:]:
        many.add_adapter(name, lora)
    many.set_adapter(names[0])
    lone = peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora)
    for model in (many, lone):
        model.eval()
    build_s = time.perf_counter() - t0

    rng = np.random.default_rng(spec["seed"])
    vocab, seq, batch = arch["vocabulary_size"], spec["seq"], spec["batch"]
    ids = torch.from_numpy(rng.integers(0, vocab, (batch, seq)).astype("int64"))
    mask = torch.ones_like(ids)

    def forward(model, **kwargs):
        def run():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, **kwargs).logits

        return run

    def generate(model, **kwargs):
        def run():
            with torch.no_grad():
                return model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=spec["new_tokens"],
                    min_new_tokens=spec["new_tokens"],
                    do_sample=False,
                    pad_token_id=0,
                    **kwargs,
                )

        return run

    result = {"build_s": round(build_s, 2), "rows": rows}
    for task, make, repeats in (
        ("forward", forward, spec["repeats"]),
        ("generate", generate, spec["generate_repeats"]),
    ):
        variants = {
            "lone": make(lone),
            "single": make(many),
            "mixed": make(many, adapter_names=rows),
        }
        for label, fn in variants.items():
            start = time.perf_counter()
            fn()
            result[f"{task}_{label}_first_call_s"] = round(
                time.perf_counter() - start, 3
            )
        for fn in variants.values():  # Steady state (JAX re-traces once).
            fn()
        samples = alternate(list(variants.values()), repeats)
        tokens_per_call = batch * (seq if task == "forward" else spec["new_tokens"])
        for label, times in zip(variants, samples, strict=True):
            median = statistics.median(times)
            result[f"{task}_{label}_s"] = round(median, 4)
            result[f"{task}_{label}_samples_s"] = times
            result[f"{task}_{label}_tokens_per_s"] = round(tokens_per_call / median, 1)

    with torch.no_grad():
        mixed = forward(many, adapter_names=rows)().numpy()
        worst = 0.0
        for name in dict.fromkeys(rows):
            many.set_adapter(name)
            alone = forward(many)().numpy()
            picked = [i for i, n in enumerate(rows) if n == name]
            worst = max(worst, float(np.max(np.abs(mixed[picked] - alone[picked]))))
    result["mixed_vs_single_max_abs_diff"] = worst

    repeat, after_switch = [], []
    many.set_adapter(names[0])
    generate(many)()
    for name in names[1 : 1 + spec["switches"]]:
        start = time.perf_counter()
        generate(many)()
        repeat.append(round(time.perf_counter() - start, 4))
        many.set_adapter(name)
        start = time.perf_counter()
        generate(many)()
        after_switch.append(round(time.perf_counter() - start, 4))
    result.update(
        generate_repeat_s=round(statistics.median(repeat), 4),
        generate_after_switch_s=round(statistics.median(after_switch), 4),
        generate_repeat_samples_s=repeat,
        generate_after_switch_samples_s=after_switch,
    )
    return result
