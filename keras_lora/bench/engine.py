"""Compare keras-lora with full fine-tuning, Keras's built-in LoRA and PEFT.

`compare(CompareConfig(...))` trains the same GPT-2 on the same token data
(random ids, or `tokens` from real text, with `eval_batches` held out) with
the same batch and number of steps, once per (backend, run). Each run is a
child process, `python -m keras_lora.bench.worker SPEC.json`, because
Keras fixes its backend at import and a run's peak memory must be its own:

    full     full fine-tuning;
    lora     keras_lora.inject_lora (the family's default targets);
    builtin  keras-hub's backbone.enable_lora(rank, target_layer_names);
    floor    everything frozen except one bias vector of block 0: a forward
             pass plus back-propagation to the first block, which any
             adapter there pays;
    peft     Hugging Face PEFT (LoRA on a transformers GPT2LMHeadModel of
             the same size), on torch, as an outside peer.

The LoRA run can also train over a cheaper frozen base: `base_dtypes`
(bfloat16: the whole model under that dtype policy), `quantize` (int8,
int4: `model.quantize(mode)` before `inject_lora`) and `remat`
("activations": build and inject inside `keras.RematScope`). Every
combination asked for is one more LoRA row, labelled by its `variant`
(e.g. "int8, remat"); the plain float32 row has variant "".

The default model is the GPT-2 base architecture with RANDOM weights, so it
runs offline; every output says so. Writes `results.json`, `results.md` and
bar charts into `out` (`keras_lora.bench.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

from keras_lora.bench import report
from keras_lora.families import GPT2
from keras_lora.files import atomic_write
from keras_lora.recipes.models import ARCHITECTURES, architecture

BACKENDS = ("jax", "tensorflow", "torch")
RUNS = ("full", "lora", "builtin", "floor", "peft")
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# Frozen-base options of the LoRA run (each list: the rows to run).
BASE_DTYPES = ("float32", "bfloat16")
QUANTIZE_MODES = ("none", "int8", "int4")
# keras-hub GPT-2 fails in Keras itself under RematScope "full" and
# "larger_than" (tests/test_remat.py), so only "activations" is offered.
# "blocks" checkpoints each transformer block (`keras_lora.remat_layers`).
REMAT_MODES = ("none", "activations", "blocks")
# How a quantized LoRA base is built: "after" quantizes a float model
# (`model.quantize`), "during" builds each layer quantized
# (`keras_lora.families.quantized_dtype`), so no float copy exists.
QUANTIZE_BUILDS = ("after", "during")
# The training loss of every run: "dense" computes the full logits,
# "chunked" the cross-entropy in pieces of the sequence
# (`keras_lora.chunked_causal_lm`).
LOSSES = ("dense", "chunked")
# The PEFT run's precision, one row each: "none" follows --dtype-policy
# like the Keras runs; "bfloat16" trains under torch.autocast(bfloat16),
# the peer of a Keras bfloat16 base (weights float32, matmuls bfloat16).
PEFT_AUTOCAST = ("none", "bfloat16")
PEFT_AUTOCAST_LABELS = {"none": "", "bfloat16": "bf16 autocast"}
# Preset names whose size is known without reading them (offline).
PRESET_SIZES = {
    "gpt2_base_en": "base",
    "gpt2_medium_en": "medium",
    "gpt2_large_en": "large",
}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What `compare` runs; checked and normalised when made.

    Args:
        out: output directory.
        backends: Keras backends for the Keras runs.
        runs: which runs (`RUNS`), run in that order.
        arch: a random-weight architecture (`recipes.models.ARCHITECTURES`).
        preset: a keras-hub GPT-2 preset (name or local directory) for the
            Keras runs instead; the PEFT run uses its size, random weights.
        batch, seq: sequences per step and tokens per sequence.
        steps, warmup: timed steps, after untimed ones (compilation).
        rank, alpha: the LoRA settings.
        targets: GPT-2 projection roles to adapt (`GPT2.roles`), or
            ("all",); every run adapts the same layers, so no regexes.
        dtype_policy: Keras dtype policy (PEFT uses torch autocast to match).
        learning_rate: AdamW's learning rate.
        seed: seed for weights and random token data.
        tokens: a .npy of int ids, shape (rows, seq + 1), instead of random.
        eval_batches: hold out this many batches (the last rows) and report
            each run's loss on them.
        inference_runs: timed forward passes (each) for the LoRA run.
        rounds: repeat every run, round-robin; each reports its fastest.
        timeout: seconds allowed per run.
        base_dtypes: dtypes of the LoRA run's whole model (`BASE_DTYPES`).
        quantize: quantization modes of its frozen base (`QUANTIZE_MODES`).
        remat: `keras.RematScope` modes it is built in (`REMAT_MODES`).
            The LoRA run is repeated for every combination of these three.
        peft_autocast: the PEFT run's precisions, one row each
            (`PEFT_AUTOCAST`).
        dropout: the model's dropout rate in every run (Keras and PEFT), or
            None for GPT-2's own (0.1). 0 lets Keras's attention take
            `ops.dot_product_attention` (torch SDPA on the torch backend);
            random-weight architectures only.
        command: the command line the report names.
    """

    out: str
    backends: tuple[str, ...] = ("jax", "tensorflow")
    runs: tuple[str, ...] = RUNS
    arch: str = "base"
    preset: str | None = None
    batch: int = 8
    seq: int = 128
    steps: int = 10
    warmup: int = 3
    rank: int = 4
    alpha: float = 32.0
    targets: tuple[str, ...] = GPT2.default_targets
    dtype_policy: str = "float32"
    learning_rate: float = 5e-5
    seed: int = 0
    tokens: str | None = None
    eval_batches: int = 0
    inference_runs: int = 8
    rounds: int = 1
    timeout: float = 3600.0
    base_dtypes: tuple[str, ...] = ("float32",)
    quantize: tuple[str, ...] = ("none",)
    remat: tuple[str, ...] = ("none",)
    quantize_build: tuple[str, ...] = ("after",)
    losses: tuple[str, ...] = ("dense",)
    loss_chunks: int = 8
    peft_autocast: tuple[str, ...] = ("none",)
    dropout: float | None = None
    command: str = "keras_lora.bench.engine.compare"

    def __post_init__(self):
        backends = list(dict.fromkeys(self.backends))
        bad = [b for b in backends if b not in BACKENDS]
        if bad or not backends:
            raise ValueError(
                f"unknown backend {bad or backends}: choose from "
                f"{', '.join(BACKENDS)}, e.g. --backend jax tensorflow"
            )
        bad = [r for r in self.runs if r not in RUNS]
        if bad or not self.runs:
            raise ValueError(
                f"unknown run {bad or list(self.runs)}: choose from "
                f"{', '.join(RUNS)}, e.g. --runs lora floor"
            )
        targets = list(GPT2.roles) if tuple(self.targets) == ("all",) else self.targets
        bad = [t for t in targets if t not in GPT2.roles]
        if bad or not targets:
            raise ValueError(
                f"unknown target {bad or list(targets)}: use layer names among "
                f"{', '.join(GPT2.roles)}, or 'all' (every run must adapt the "
                "same layers, so regexes are not accepted here)"
            )
        if self.preset is None:
            architecture(self.arch)
        for name in (
            "batch",
            "seq",
            "steps",
            "rank",
            "inference_runs",
            "rounds",
            "loss_chunks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("warmup", "eval_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more")
        if not self.alpha > 0:
            raise ValueError("--alpha must be positive")
        if self.dropout is not None:
            if not 0 <= self.dropout < 1:
                raise ValueError(f"--dropout {self.dropout} must be in [0, 1)")
            if self.preset:
                raise ValueError(
                    "--dropout applies to random-weight architectures: a "
                    "preset keeps the dropout of its config (drop --dropout "
                    "or use --arch)"
                )
        if self.dtype_policy not in DTYPE_POLICIES:
            raise ValueError(
                f"--dtype-policy {self.dtype_policy!r}: choose from "
                f"{', '.join(DTYPE_POLICIES)}"
            )
        for name, allowed in (
            ("base_dtypes", BASE_DTYPES),
            ("quantize", QUANTIZE_MODES),
            ("remat", REMAT_MODES),
            ("quantize_build", QUANTIZE_BUILDS),
            ("losses", LOSSES),
            ("peft_autocast", PEFT_AUTOCAST),
        ):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                flag = {
                    "base_dtypes": "--base-dtype",
                    "quantize_build": "--quantize-build",
                    "losses": "--loss",
                    "peft_autocast": "--peft-autocast",
                }.get(name, f"--{name}")
                raise ValueError(
                    f"{flag} {bad or list(values)}: choose among "
                    f"{', '.join(allowed)}"
                    + (
                        " (RematScope 'full' and 'larger_than' are not "
                        "supported by Keras for keras-hub GPT-2: they fail "
                        "in Keras itself)"
                        if name == "remat"
                        else ""
                    )
                )
            object.__setattr__(self, name, tuple(v for v in allowed if v in values))
        object.__setattr__(self, "backends", tuple(backends))
        object.__setattr__(self, "runs", tuple(r for r in RUNS if r in self.runs))
        object.__setattr__(
            self, "targets", tuple(t for t in GPT2.roles if t in targets)
        )


def installed_backends() -> list[str]:
    """The Keras backends whose framework is importable here, in `BACKENDS`
    order (without importing them; each backend is named as its module)."""
    import importlib.util

    return [b for b in BACKENDS if importlib.util.find_spec(b)]


def model_config(config: CompareConfig) -> tuple[dict, str]:
    """The backbone arguments and the label every output carries."""
    if config.preset:
        arch = preset_arch(config.preset)
        label = f"GPT-2 preset {config.preset} (PEFT run: same size, RANDOM weights)"
    else:
        shape = architecture(config.arch)
        arch = shape.backbone_config()
        label = f"{shape.label}, RANDOM weights"
    if config.seq > arch["max_sequence_length"]:
        raise ValueError(
            f"--seq {config.seq} exceeds the model's max_sequence_length "
            f"{arch['max_sequence_length']}"
        )
    return arch, label


def preset_arch(preset: str) -> dict:
    """The backbone arguments of a local preset, or of a known preset name."""
    config_path = os.path.join(preset, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        config = config.get("config", config)
        keys = ARCHITECTURES["base"].backbone_config()
        arch = {k: config[k] for k in keys if k in config}
        missing = set(keys) - set(arch)
        if missing:
            raise ValueError(
                f"{config_path} lacks {', '.join(sorted(missing))}: pass a "
                "keras-hub GPT-2 preset directory"
            )
        return arch
    if preset not in PRESET_SIZES:
        raise ValueError(
            f"cannot tell the architecture of preset {preset!r}: pass a "
            "local preset directory (with config.json) or one of "
            f"{', '.join(PRESET_SIZES)}"
        )
    return architecture(PRESET_SIZES[preset]).backbone_config()


def check_tokens(config: CompareConfig, vocabulary_size: int) -> str:
    """Validate `config.tokens` against the run; returns the data label.

    Raises:
        ValueError: for an unreadable file, a wrong shape or dtype, too few
            rows or ids outside the vocabulary.
    """
    if not config.tokens:
        return f"random token ids (numpy default_rng, seed {config.seed})"
    import numpy as np

    name = f"--tokens {config.tokens!r}"
    try:
        rows = np.load(config.tokens, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{name}: cannot read a .npy ({error})") from error
    needed = (config.warmup + config.steps + config.eval_batches) * config.batch
    if rows.ndim != 2 or rows.shape[1] != config.seq + 1:
        raise ValueError(
            f"{name} has shape {rows.shape}; expected (rows, {config.seq + 1}) "
            f"for --seq {config.seq} (inputs plus the next token)"
        )
    if rows.dtype.kind not in "iu":
        raise ValueError(f"{name} holds {rows.dtype}, not int ids")
    if len(rows) < needed:
        raise ValueError(
            f"{name} has {len(rows)} rows; (warmup {config.warmup} + steps "
            f"{config.steps} + eval batches {config.eval_batches}) x batch "
            f"{config.batch} = {needed} are needed (lower --steps or --batch, "
            "or tokenize more text)"
        )
    if rows.size and (rows.min() < 0 or rows.max() >= vocabulary_size):
        raise ValueError(
            f"{name} has ids in [{rows.min()}, {rows.max()}]; the model's "
            f"vocabulary is {vocabulary_size}"
        )
    return f"token ids from {os.path.abspath(config.tokens)} ({len(rows)} rows)"


def lora_variants(config: dict) -> list[dict]:
    """The LoRA run's frozen-base settings, one dict per row to run.

    Each has `base_dtype`, `quantize`, `quantize_build`, `remat`, `loss`
    and `variant`, its label ("" for the plain float32 run, else e.g.
    "int8, remat"). A config written before these options existed gives
    the plain run only.
    """
    variants = []
    for dtype in config.get("base_dtypes", ["float32"]):
        for mode in config.get("quantize", ["none"]):
            builds = config.get("quantize_build", ["after"]) if mode != "none" else []
            for build in builds or ["after"]:
                for remat in config.get("remat", ["none"]):
                    for loss in config.get("losses", ["dense"]):
                        parts = [
                            p for p in (dtype, mode) if p not in ("float32", "none")
                        ]
                        if build == "during":
                            parts[-1] += " built quantized"
                        if remat != "none":
                            parts.append(
                                "remat" if remat == "activations" else f"remat {remat}"
                            )
                        if loss != "dense":
                            parts.append(f"{loss} CE")
                        variants.append(
                            {
                                "base_dtype": dtype,
                                "quantize": mode,
                                "quantize_build": build,
                                "remat": remat,
                                "loss": loss,
                                "variant": ", ".join(parts),
                            }
                        )
    return variants


def plan_for(config: dict) -> list[tuple[str, str, dict]]:
    """(backend, run, frozen-base settings) in run order; PEFT on torch,
    once per `peft_autocast` precision.

    Runs other than LoRA get the plain settings (variant ""), once per
    training loss.
    """
    variants = lora_variants(config)
    plain = [
        {
            "base_dtype": "float32",
            "quantize": "none",
            "quantize_build": "after",
            "remat": "none",
            "loss": loss,
            "variant": "" if loss == "dense" else f"{loss} CE",
        }
        for loss in config.get("losses", ["dense"])
    ]
    plan = [
        (b, r, v)
        for b in config["backends"]
        for r in config["runs"]
        if r != "peft"
        for v in (variants if r == "lora" else plain)
    ]
    if "peft" in config["runs"]:
        for autocast in config.get("peft_autocast", ["none"]):
            label = PEFT_AUTOCAST_LABELS[autocast]
            variant = plain[0]["variant"]
            plan.append(
                (
                    "torch",
                    "peft",
                    dict(
                        plain[0],
                        autocast=autocast,
                        variant=", ".join(p for p in (variant, label) if p),
                    ),
                )
            )
    return plan


def run_dtype_policy(dtype_policy: str, variant: dict) -> str | None:
    """The dtype policy a run's spec carries (None: float32); a PEFT row
    with bfloat16 autocast trains under "mixed_bfloat16"."""
    if variant.get("autocast", "none") != "none":
        return f"mixed_{variant['autocast']}"
    return None if dtype_policy == "float32" else dtype_policy


def run_child(spec: dict, backend: str, log_path: str, timeout: float) -> dict:
    """One run in a fresh process; its result, or an error result."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    spec_path = spec["result_path"].replace(".json", ".spec.json")
    atomic_write(spec_path, json.dumps(spec, indent=2).encode("utf-8"))
    if os.path.exists(spec["result_path"]):
        os.remove(spec["result_path"])
    # The worker is a module of this package: the child imports keras_lora
    # exactly as this process found it (installed or on PYTHONPATH).
    command = [sys.executable, "-m", "keras_lora.bench.worker", spec_path]
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    if os.path.exists(spec["result_path"]):
        with open(spec["result_path"]) as f:
            return json.load(f)
    return {
        "run": spec["run"],
        "backend": backend,
        "status": "error",
        "error": f"worker exited with {returncode} and no result; see {log_path}",
    }


def pick_round(
    every_round: list[dict], backend: str, run: str, warmup: int, variant: str = ""
) -> dict:
    """The round of (backend, run, variant) with the lowest median step time.

    Adds `round_median_steps_s` (every round's median) and `min_step_s`
    (the fastest timed step of any round: the least disturbed estimate).
    """
    rounds = [
        r
        for r in every_round
        if (r["backend"], r["run"], r.get("variant", "")) == (backend, run, variant)
    ]
    ok = [r for r in rounds if r.get("status") == "ok"]
    if not ok:
        return rounds[-1]
    best = dict(min(ok, key=lambda r: r["median_step_s"]))
    best["round_median_steps_s"] = [r["median_step_s"] for r in ok]
    best["min_step_s"] = min(min(r["step_times_s"][warmup:]) for r in ok)
    return best


def succeeded(results: dict) -> bool:
    """Whether every run of a `compare` result finished."""
    return all(r.get("status") == "ok" for r in results["results"])


def write_outputs(config: dict, every_round: list[dict], out: str) -> dict:
    """Pick each run's round, write JSON, markdown and charts, print them."""
    results = [
        pick_round(every_round, backend, run, config["warmup"], v["variant"])
        for backend, run, v in plan_for(config)
    ]
    rows = report.ratios(results, config)
    data = {
        "config": config,
        "results": results,
        "ratios": rows,
        "all_rounds": every_round,
    }
    atomic_write(
        os.path.join(out, "results.json"), json.dumps(data, indent=2).encode("utf-8")
    )
    text = report.markdown(config, results, rows)
    atomic_write(os.path.join(out, "results.md"), text.encode("utf-8"))
    charts = report.plots(config, results, out)
    print("\n" + text)
    print(
        f"Wrote {os.path.join(out, 'results.json')}, results.md, "
        + ", ".join(os.path.basename(c) for c in charts)
    )
    return data


def read_results(results_json: str) -> tuple[dict, str]:
    """An earlier results.json of `compare` (either mode) and its directory.

    Raises:
        FileNotFoundError: when `results_json` does not exist.
        ValueError: when it is not a `compare` result.
    """
    with open(results_json) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{results_json} is not JSON: {error}") from error
    if not isinstance(data, dict) or "config" not in data or "results" not in data:
        raise ValueError(f"{results_json} is not a results.json of compare")
    return data, os.path.dirname(os.path.abspath(results_json))


def render(data: dict, out: str) -> dict:
    """Rewrite the table, ratios and charts of an earlier training
    comparison (`read_results`) in `out`. (A mixed-batch result renders
    with `keras_lora.bench.mixed.render`.)"""
    every_round = data.get("all_rounds") or data["results"]
    return write_outputs(data["config"], every_round, out)


def compare(config: CompareConfig) -> dict:
    """Run every (backend, run) of `config`, each in its own process.

    Args:
        config: what to run.

    Returns:
        What `results.json` holds: `{"config", "results", "ratios",
        "all_rounds"}`; a failed run has `"status": "error"` and an
        `"error"` (see `succeeded`).

    Raises:
        ValueError: for a bad preset, sequence length or token file, before
            anything runs.
    """
    arch, label = model_config(config)
    data_label = check_tokens(config, arch["vocabulary_size"])
    out = os.path.abspath(config.out)
    runs_dir = os.path.join(out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    settings = {
        "command": config.command,
        "model_label": label,
        "weights": f"preset {config.preset}" if config.preset else "random",
        "arch": arch,
        "preset": config.preset,
        "backends": list(config.backends),
        "runs": list(config.runs),
        "batch": config.batch,
        "seq": config.seq,
        "steps": config.steps,
        "warmup": config.warmup,
        "rank": config.rank,
        "alpha": config.alpha,
        "targets": list(config.targets),
        "dtype_policy": config.dtype_policy,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "inference_runs": config.inference_runs,
        "rounds": config.rounds,
        "data": data_label,
        "tokens_path": os.path.abspath(config.tokens) if config.tokens else None,
        "eval_batches": config.eval_batches,
        "base_dtypes": list(config.base_dtypes),
        "quantize": list(config.quantize),
        "remat": list(config.remat),
        "quantize_build": list(config.quantize_build),
        "losses": list(config.losses),
        "loss_chunks": config.loss_chunks,
        "peft_autocast": list(config.peft_autocast),
        "dropout": config.dropout,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
    }
    plan = plan_for(settings)
    print(f"{label}\n{report.describe(settings)}\n", flush=True)

    every_round = []
    total = len(plan) * config.rounds
    for round_index in range(config.rounds):
        for backend, run, variant in plan:
            name = f"{backend}-{run}"
            if variant["variant"]:
                name += "-" + variant["variant"].replace(", ", "-")
            if config.rounds > 1:
                name += f"-round{round_index + 1}"
            spec = dict(
                settings,
                **variant,
                run=run,
                backend=backend,
                dtype_policy=run_dtype_policy(config.dtype_policy, variant),
                result_path=os.path.join(runs_dir, f"{name}.json"),
            )
            print(
                f"[{len(every_round) + 1}/{total}] {backend:10s} "
                f"{report.run_label(run, variant['variant']):28s} ",
                end="",
                flush=True,
            )
            started = time.perf_counter()
            log_path = os.path.join(runs_dir, f"{name}.log")
            result = run_child(spec, backend, log_path, config.timeout)
            result["round"] = round_index + 1
            result.setdefault("variant", variant["variant"])
            elapsed = time.perf_counter() - started
            if result.get("status") == "ok":
                print(
                    f"{elapsed:6.1f} s  median step {result['median_step_s']:.3f} s  "
                    f"peak {result['peak_memory_gb']:.2f} GB  "
                    f"load {result['load_average_1min']:.1f}",
                    flush=True,
                )
            else:
                print(f"{elapsed:6.1f} s  FAILED: {result.get('error')}", flush=True)
            every_round.append(result)
    return write_outputs(settings, every_round, out)
