"""The mixed-batch benchmark: many adapters served in one batch.

`compare_mixed(MixedConfig(...))` starts one child process per Keras
backend (`mixed-keras`, `keras_lora.bench.mixed_keras`) and one for PEFT on
torch (`mixed-peft`, `keras_lora.bench.mixed_peft`), each through the
same worker as the training benchmark (`keras_lora.bench.worker`). Each run
times, inside its own process, a batch whose rows all use different
adapters against the same batch with one adapter (a model holding one
adapter, and the many-adapter model with one active), for a forward pass
and for `generate`; and the first `generate` after `set_adapter` against a
repeat. Ratios are computed from medians of one run, never across runs.

Writes `results.json` and `results.md` into `out`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

from keras_lora.bench import engine
from keras_lora.bench.compare_config import BACKENDS
from keras_lora.families import GPT2
from keras_lora.files import atomic_write
from keras_lora.recipes.models import architecture

TARGET = 0.85  # Mixed throughput / single-adapter throughput, JAX and TF.


@dataclasses.dataclass(frozen=True)
class MixedConfig:
    """What `compare_mixed` runs.

    Args:
        out: output directory.
        backends: Keras backends (`BACKENDS`).
        peft: also run PEFT (torch) as the outside peer.
        arch: a random-weight GPT-2 architecture (`recipes.models`).
        adapters: adapters in the model; row i uses adapter i mod adapters.
        rank, alpha, targets: every adapter's settings.
        batch, seq: rows and prompt tokens.
        new_tokens: tokens `generate` adds.
        repeats, generate_repeats: timed calls per variant (medians).
        switches: `set_adapter` switches timed.
        seed: seed for weights and token ids.
        timeout: seconds per run.
        command: the command line the report names.
    """

    out: str
    backends: tuple[str, ...] = ("jax", "tensorflow", "torch")
    peft: bool = True
    arch: str = "base"
    adapters: int = 8
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = GPT2.default_targets
    batch: int = 8
    seq: int = 128
    new_tokens: int = 32
    repeats: int = 5
    generate_repeats: int = 3
    switches: int = 3
    seed: int = 0
    timeout: float = 3600.0
    command: str = "keras_lora.bench.mixed.compare_mixed"

    def __post_init__(self):
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ValueError(
                f"unknown backend {bad or list(self.backends)}: choose from "
                f"{', '.join(BACKENDS)}"
            )
        for name in ("adapters", "rank", "batch", "seq", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.generate_repeats < 1 or self.switches < 1:
            raise ValueError("--repeats and switches must be at least 1")
        if self.switches >= self.adapters:
            object.__setattr__(self, "switches", max(1, self.adapters - 1))
        architecture(self.arch)  # Raises for an unknown one.


def compare_mixed(config: MixedConfig) -> dict:
    """Run the mixed-batch benchmark; returns what `results.json` holds."""
    shape = architecture(config.arch)
    arch = shape.backbone_config()
    if config.seq + config.new_tokens > arch["max_sequence_length"]:
        raise ValueError(
            f"--seq {config.seq} + {config.new_tokens} new tokens exceed the "
            f"model's max_sequence_length {arch['max_sequence_length']}"
        )
    out = os.path.abspath(config.out)
    runs_dir = os.path.join(out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    settings = dict(
        dataclasses.asdict(config),
        mode="mixed",
        model_label=f"{shape.label}, RANDOM weights",
        arch=arch,
        preset=None,
        backends=list(config.backends),
        targets=list(config.targets),
        machine={
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
    )
    plan = [(b, "mixed-keras") for b in config.backends]
    if config.peft:
        plan.append(("torch", "mixed-peft"))
    print(settings["model_label"], flush=True)
    results = []
    for i, (backend, run) in enumerate(plan):
        name = f"{backend}-{run}"
        spec = dict(
            settings,
            run=run,
            backend=backend,
            result_path=os.path.join(runs_dir, f"{name}.json"),
        )
        print(f"[{i + 1}/{len(plan)}] {backend:10s} {run:12s} ", end="", flush=True)
        started = time.perf_counter()
        log = os.path.join(runs_dir, f"{name}.log")
        result = engine.run_child(spec, backend, log, config.timeout)
        status = "ok" if result.get("status") == "ok" else result.get("error")
        print(f"{time.perf_counter() - started:6.1f} s  {status}", flush=True)
        results.append(result)
    return write_outputs(settings, results, out)


def write_outputs(config: dict, results: list[dict], out: str) -> dict:
    """Ratios, `results.json` and `results.md` in `out`; prints the table."""
    data = {"config": config, "results": results, "ratios": ratios(results)}
    atomic_write(
        os.path.join(out, "results.json"), json.dumps(data, indent=2).encode("utf-8")
    )
    text = markdown(config, results, data["ratios"])
    atomic_write(os.path.join(out, "results.md"), text.encode("utf-8"))
    print("\n" + text)
    return data


def render(data: dict, out: str) -> dict:
    """Rewrite the ratios and table of an earlier mixed `results.json`."""
    return write_outputs(data["config"], data["results"], out)


def ratios(results: list[dict]) -> list[dict]:
    """Per run: mixed and single throughput over the one-adapter model's,
    mixed over single, and the first generate after a switch over a repeat."""
    rows = []
    for r in results:
        if r.get("status") != "ok":
            continue
        who = (
            "PEFT (torch)" if r["run"] == "mixed-peft" else f"keras-lora {r['backend']}"
        )
        target = (
            TARGET if r["run"] == "mixed-keras" and r["backend"] != "torch" else None
        )
        for task in ("forward", "generate"):
            lone, single, mixed = (
                r[f"{task}_{v}_s"] for v in ("lone", "single", "mixed")
            )
            for ratio, value, goal in (
                (f"{task}: mixed / one-adapter model", lone / mixed, target),
                (f"{task}: mixed / one active adapter", single / mixed, target),
                (
                    f"{task}: one active of many / one-adapter model",
                    lone / single,
                    None,
                ),
            ):
                rows.append(_row(who, ratio, value, goal))
        rows.append(
            _row(
                who,
                "generate: repeat / first after set_adapter",
                r["generate_repeat_s"] / r["generate_after_switch_s"],
                0.9 if r["run"] == "mixed-keras" else None,
            )
        )
    return rows


def _row(who, ratio, value, target) -> dict:
    verdict = "" if target is None else ("met" if value >= target else "MISSED")
    return {
        "who": who,
        "ratio": ratio,
        "value": round(value, 3),
        "target": target,
        "verdict": verdict,
    }


def markdown(config: dict, results: list[dict], rows: list[dict]) -> str:
    """The report: settings, median times, throughput ratios."""
    lines = [
        "# Mixed-batch benchmark",
        "",
        f"{config['model_label']}; {config['adapters']} adapters of rank "
        f"{config['rank']} on {', '.join(config['targets'])}; batch "
        f"{config['batch']} x {config['seq']} tokens, every row its own "
        f"adapter (row i: adapter i mod {config['adapters']}); `generate` "
        f"of {config['new_tokens']} tokens (greedy). Medians of "
        f"{config['repeats']} forward / {config['generate_repeats']} "
        "generate calls per variant, alternated; ratios inside one run.",
        f"Command: `{config['command']}`. Machine: {config['machine']['platform']}, "
        f"{config['machine']['cpu_count']} CPUs.",
        "",
        "| run | forward lone s | forward single s | forward mixed s "
        "| generate lone s | generate single s | generate mixed s "
        "| generate repeat s | first after set_adapter s "
        "| first generate (traces, compiles) s | max |mixed - single| |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        who = f"{r.get('backend')} {r.get('run')}"
        if r.get("status") != "ok":
            lines.append(f"| {who} | FAILED: {r.get('error')} |" + " |" * 9)
            continue
        cells = [
            r[k]
            for k in (
                "forward_lone_s",
                "forward_single_s",
                "forward_mixed_s",
                "generate_lone_s",
                "generate_single_s",
                "generate_mixed_s",
                "generate_repeat_s",
                "generate_after_switch_s",
                "generate_single_first_call_s",
            )
        ]
        diff = f"{r['mixed_vs_single_max_abs_diff']:.1e}"
        lines.append(f"| {who} | " + " | ".join(map(str, cells)) + f" | {diff} |")
    lines += [
        "",
        "lone: a model holding one adapter; single: the model holding all "
        "adapters, one active (`set_adapter`); mixed: every row its own "
        "adapter (keras-lora `adapter_batch`, PEFT `adapter_names=`). A ratio "
        "is a throughput ratio (time of the reference / time of the row). "
        "A switch that traced and compiled again would cost about the first "
        "generate's time.",
        "",
        "| who | ratio | value | target | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        target = "" if row["target"] is None else f">= {row['target']}"
        lines.append(
            f"| {row['who']} | {row['ratio']} | {row['value']} | {target} "
            f"| {row['verdict']} |"
        )
    return "\n".join(lines) + "\n"
