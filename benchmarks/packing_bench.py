"""Fixed padding vs length buckets vs packing, keras-lora vs TRL + PEFT.

A Llama-architecture model with random weights (GPT-2 base's widths, or
`--small`) is fine-tuned with LoRA for one pass over a skewed instruction
set (prompt + completion lengths drawn from a seeded log-normal: most under
64 tokens, a tail to `--max-length`). Every run is its own process:
keras-lora `sft` with `--buckets off`, buckets (the default) and
`--packing` on each Keras backend, and TRL's `SFTTrainer` + PEFT on torch,
padded and with TRL's own packing. Each run reports real (non-padding)
tokens per second over the steps after the first, its peak host memory
(`ru_maxrss` of the child) and its eval loss after the pass.

    python benchmarks/packing_bench.py --out /tmp/packing --small

Writes `OUT/results.json` and `OUT/results.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("jax", "tensorflow", "torch")
MODELS = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
}


def skewed_lengths(n: int, seed: int, max_length: int, median: float = 28.0) -> list:
    """Token counts of `n` examples from a seeded log-normal (sigma 1), so
    about 80% are under 64 tokens and the tail is cut at `max_length`.

    Args:
        n: how many lengths.
        seed: the generator's seed.
        max_length: the longest length.
        median: the distribution's median.

    Example:

    >>> lengths = skewed_lengths(1000, 0, 1024)
    >>> 0.7 < float(np.mean(np.array(lengths) < 64)) < 0.9, max(lengths) <= 1024
    (True, True)
    """
    rng = np.random.default_rng(seed)
    drawn = rng.lognormal(math.log(median), 1.0, n)
    return [int(x) for x in np.clip(np.round(drawn), 8, max_length)]


def write_data(path: str, lengths: list, tokenizer_file: str, seed: int) -> str:
    """A prompt-completion JSONL whose examples have about `lengths` tokens
    (random words of the fixture corpus; 40% prompt, 60% completion)."""
    from tokenizers import Tokenizer

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from sft_fixtures import CORPUS

    words = sorted({w for line in CORPUS for w in line.split()})
    tokenizer = Tokenizer.from_file(tokenizer_file)
    per_word = len(tokenizer.encode(" ".join(words)).ids) / len(words)
    rng = np.random.default_rng(seed + 1)

    def text(tokens: int) -> str:
        count = max(1, round(tokens / per_word))
        return " ".join(rng.choice(words, count))

    with open(path, "w", encoding="utf-8") as f:
        for n in lengths:
            prompt = text(0.4 * n)
            f.write(json.dumps({"prompt": prompt, "completion": " " + text(0.6 * n)}))
            f.write("\n")
    return path


def write_model(path: str, size: str, vocab: int, max_length: int) -> dict:
    """The fixtures' llama3 tokenizer and a random Llama of `size` widths."""
    import torch
    import transformers

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from sft_fixtures import build_model_dir

    build_model_dir("llama3", path)
    widths = MODELS[size]
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        intermediate_size=4 * widths["hidden_size"],
        num_key_value_heads=widths["num_attention_heads"],
        max_position_embeddings=max(1024, max_length),
        tie_word_embeddings=False,
        **widths,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    return widths | {"vocab_size": vocab, "parameters": int(params)}


def rows_per_step(model: str, data: str, batch: int, max_length: int) -> dict:
    """Packed rows per step so that a step sees about `batch` examples."""
    from keras_lora.recipes.sft.config import SftConfig
    from keras_lora.recipes.sft.inspection import prepare_data
    from keras_lora.recipes.sft.packing import pack_rows

    _, _, encoded = prepare_data(
        SftConfig(model, data, "unused", max_length=max_length)
    )
    lengths = [len(e.input_ids) for e in encoded.examples]
    per_row = len(lengths) / len(pack_rows(lengths, max_length))
    return {
        "rows": max(1, round(batch / per_row)),
        "examples_per_row": per_row,
        "tokens": {
            "mean": float(np.mean(lengths)),
            "median": float(np.median(lengths)),
            "max": int(max(lengths)),
            "under_64": float(np.mean(np.array(lengths) < 64)),
        },
    }


# ---------------------------------------------------------------- children


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM of its own address
    space (`ru_maxrss` would also count the parent's memory at the fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_keras(spec: dict) -> dict:
    """keras-lora's `sft` recipe on the Keras backend of this process."""
    from keras_lora.recipes.sft.config import SftConfig
    from keras_lora.recipes.sft.run import train

    config = SftConfig(
        model=spec["model"],
        data=spec["train"],
        out=spec["run_out"],
        eval_data=spec["eval"],
        max_length=spec["max_length"],
        rank=spec["rank"],
        alpha=spec["alpha"],
        batch=spec["batch"],
        epochs=1,
        learning_rate=spec["learning_rate"],
        seed=spec["seed"],
        packing=spec["packing"],
        buckets=spec["buckets"],
        quiet=True,
        generate_prompts=0,
    )
    start = time.perf_counter()
    report = train(config)
    return {
        "real_tokens_per_s": report["train_tokens_per_s"],
        "compile_s": report["compile_s"],
        "padding_fraction": report["padding_fraction"],
        "steps": report["steps"],
        "examples_per_step": report["data"]["kept"] / report["steps"],
        "examples_per_row": report["examples_per_row"],
        "traced_step_functions": report["traced_step_functions"],
        "eval_loss_before": report["eval_loss_before"],
        "eval_loss_after": report["eval_loss_after"],
        "wall_s": time.perf_counter() - start,
    }


def run_trl(spec: dict) -> dict:
    """TRL's `SFTTrainer` + PEFT LoRA (q, v) on torch, padded or packed."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    torch.manual_seed(spec["seed"])
    read = lambda p: [json.loads(line) for line in open(p, encoding="utf-8")]  # noqa: E731
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    marks: list[float] = []
    tokens: list[int] = [0]
    positions = [0, 0]  # Real and all token positions the steps computed.
    pad = tokenizer.pad_token_id

    class Timed(trl.SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            real = mask.sum() if mask is not None else (ids != pad).sum()
            tokens[-1] += int(real)
            positions[0] += int(real)
            positions[1] += ids.numel()
            return super().training_step(model, inputs, *args, **kwargs)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())
            tokens.append(0)

    args = trl.SFTConfig(
        output_dir=os.path.join(spec["run_out"], "trainer"),
        num_train_epochs=1,
        per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=spec["batch"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.004,  # Keras AdamW's defaults, as the Keras runs use.
        adam_epsilon=1e-7,
        max_grad_norm=0.0,  # Keras's runs do not clip.
        seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=spec["max_length"],
        packing=spec["packing"],
        use_cpu=True,
        # TRL's SFTConfig defaults to bf16 autocast and gradient checkpointing;
        # the Keras runs train in float32 without remat, so these match them.
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    lora = peft.LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = Timed(
        model=transformers.LlamaForCausalLM.from_pretrained(spec["model"]),
        args=args,
        train_dataset=datasets.Dataset.from_list(read(spec["train"])),
        eval_dataset=datasets.Dataset.from_list(read(spec["eval"])),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Clock()],
    )
    before = trainer.evaluate()["eval_loss"]
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"]
    steps = len(marks)
    # Steps after the first: tokens of steps 2..n over the time they took.
    steady = sum(tokens[1:steps]) / (marks[-1] - marks[0]) if steps > 1 else 0.0
    return {
        "real_tokens_per_s": steady,
        "padding_fraction": 1.0 - positions[0] / max(positions[1], 1),
        "steps": steps,
        "examples_per_step": len(read(spec["train"])) / max(steps, 1),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "wall_s": wall,
    }


def child(kind: str, spec_path: str) -> int:
    """Run one `kind` ("keras" or "trl") from its spec; write its result."""
    with open(spec_path) as f:
        spec = json.load(f)
    result = {"keras": run_keras, "trl": run_trl}[kind](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    with open(spec_path.replace("_spec.json", "_result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


# ---------------------------------------------------------------- parent


def plan_runs(backends: list, trl: bool) -> list:
    """(name, kind, backend, spec changes) of every run, in order."""
    runs = []
    for backend in backends:
        runs += [
            (f"keras-lora {backend} fixed", "keras", backend, {"buckets": "off"}),
            (f"keras-lora {backend} buckets", "keras", backend, {}),
            (f"keras-lora {backend} packed", "keras", backend, {"packing": True}),
        ]
    if trl:
        runs += [
            ("TRL+PEFT torch padded", "trl", "torch", {}),
            ("TRL+PEFT torch packed", "trl", "torch", {"packing": True}),
        ]
    return runs


def launch(name: str, kind: str, backend: str, spec: dict, out: str) -> dict:
    """One run in its own process; its result, or why it failed."""
    slug = name.replace(" ", "_").replace("+", "")
    spec = spec | {"run_out": os.path.join(out, "runs", slug)}
    path = os.path.join(out, "runs", f"{slug}_spec.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    env = os.environ | {"KERAS_BACKEND": backend, "PYTHONPATH": ROOT}
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, path]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:], "process_s": seconds}
    with open(path.replace("_spec.json", "_result.json")) as f:
        return json.load(f) | {"process_s": round(seconds, 1)}


def ratios(runs: dict, backends: list) -> dict:
    """Packed real tokens/s over the other runs' (the targets' ratios)."""
    rate = {n: r.get("real_tokens_per_s") for n, r in runs.items()}
    out = {}
    trl = rate.get("TRL+PEFT torch padded")
    for backend in backends:
        packed = rate.get(f"keras-lora {backend} packed")
        fixed = rate.get(f"keras-lora {backend} fixed")
        if packed and fixed:
            out[f"{backend} packed / {backend} fixed"] = packed / fixed
        if packed and trl:
            out[f"{backend} packed / TRL+PEFT padded"] = packed / trl
    return out


def markdown(report: dict) -> str:
    """The table and the ratios."""
    lines = [
        "| run | real tokens/s | padding fraction | steps | examples/step "
        "| compile s | peak RSS MB | eval loss before | eval loss after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for name, r in report["runs"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {' '.join(r['error'])} |||||||| ")
            continue
        lines.append(
            f"| {name} | {fmt(r['real_tokens_per_s'], '.0f')} "
            f"| {fmt(r.get('padding_fraction'), '.3f')} | {r['steps']} "
            f"| {r['examples_per_step']:.1f} | {fmt(r.get('compile_s'), '.1f')} "
            f"| {r['peak_rss_mb']:.0f} | {r['eval_loss_before']:.4f} "
            f"| {r['eval_loss_after']:.4f} |"
        )
    lines += ["", "| ratio (real tokens/s) | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list | None = None) -> int:
    """Parse the arguments, write the base and data, run, write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--size", choices=sorted(MODELS), default="base")
    parser.add_argument("--small", action="store_const", const="small", dest="size")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"))
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    if not args.out:
        parser.error("--out is required: the directory for the results")
    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}; pick from {BACKENDS}")
    out = os.path.abspath(args.out)
    model = os.path.join(out, "model")
    start = time.perf_counter()
    widths = write_model(model, args.size, args.vocab, args.max_length)
    tok = os.path.join(model, "tokenizer.json")
    lengths = skewed_lengths(args.examples + args.eval_examples, args.seed, 1024)
    train = write_data(
        os.path.join(out, "train.jsonl"), lengths[: args.examples], tok, args.seed
    )
    evals = write_data(
        os.path.join(out, "eval.jsonl"), lengths[args.examples :], tok, args.seed + 7
    )
    packing = rows_per_step(model, train, args.batch, args.max_length)
    base = {
        "model": model,
        "train": train,
        "eval": evals,
        "max_length": args.max_length,
        "rank": args.rank,
        "alpha": args.alpha,
        "batch": args.batch,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "packing": False,
        "buckets": "on",
    }
    runs = {}
    for name, kind, backend, changes in plan_runs(backends, not args.no_trl):
        spec = base | changes
        if spec["packing"]:
            spec["batch"] = packing["rows"]
        runs[name] = launch(name, kind, backend, spec, out)
        print(name, json.dumps(runs[name]), flush=True)
    report = {
        "settings": {
            "model": f"LlamaForCausalLM, random weights, {args.size}",
            "widths": widths,
            "examples": args.examples,
            "eval_examples": args.eval_examples,
            "batch_examples": args.batch,
            "packed_rows_per_step": packing["rows"],
            "examples_per_packed_row": round(packing["examples_per_row"], 2),
            "train_tokens": packing["tokens"],
            "max_length": args.max_length,
            "rank": args.rank,
            "alpha": args.alpha,
            "learning_rate": args.learning_rate,
            "epochs": 1,
            "seed": args.seed,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "runs": runs,
        "ratios": ratios(runs, backends),
        "seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
