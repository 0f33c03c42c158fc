"""The demo's quality part: LoRA vs full fine-tuning of a pretrained base.

keras-lora's own small pretrained GPT-2 (`recipes.pretrain`, trained on
standard-library docstrings) is fine-tuned on a clearly different domain,
Python source code (`data.python_code_split`), by each run of `RUNS`:
keras-lora's LoRA, full fine-tuning, keras-hub's own `enable_lora`, and
Hugging Face PEFT on torch loading the same weights through their Hugging
Face export (`recipes.quality_peft`, in a child process; skipped with the
reason printed when torch, transformers or peft is missing). Same steps,
same rows in the same order, each run with its own learning rate. Held-out
loss on the new domain is measured before, during and after; held-out loss
on the original domain (docstrings of modules the base never saw) before
and after, to show forgetting.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings

import keras

from keras_lora.callbacks import host_peak_rss_bytes, reset_host_peak_rss
from keras_lora.families import GPT2
from keras_lora.files import atomic_write
from keras_lora.recipes import data, pretrain, training

PROMPTS = ("def __init__(self, ", "    for key, value in ", "class ")
RUNS = ("lora", "full", "builtin", "peft")
LABELS = {
    "lora": "keras-lora",
    "full": "full fine-tuning",
    "builtin": "keras-hub enable_lora",
    "peft": "HF PEFT (torch)",
}
# All six projections of every block at rank 1 and the tied token
# embedding at rank 4 (alpha 1): 26,112 parameters, 1.96% of the base.
# The projections alone (rank 2, 18,432 parameters) recovered a third of
# full fine-tuning's gain: most of it is the code's token frequencies, which
# reach the logits through the tied output head (README, "The main job").
LORA_TARGETS = (*GPT2.roles, GPT2.embedding)
WEIGHTED = "weighted_update"  # quality.json: losses with the update times w.


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """What the quality part runs; checked when made.

    Args:
        out: directory for quality.json, the loss plot and the adapter.
        steps: training steps of each run.
        batch: rows per step.
        seq: tokens per row (at most the base's 128).
        runs: which of `RUNS` to run (lora and full always run: the
            summary compares them).
        lora_rank, lora_alpha, lora_targets: keras-lora's LoRA settings;
            the targets are `inject_lora` targets (GPT-2 roles and the
            token embedding, "token_embedding").
        embedding_rank, embedding_alpha: rank and alpha of the token
            embedding's update when "token_embedding" is a target (None:
            `lora_rank`, `lora_alpha`); its table is vocabulary x hidden,
            so it may want another rank than the projections.
        lora_learning_rate, full_learning_rate, builtin_learning_rate,
        peft_learning_rate: each run's AdamW rate.
        eval_every: steps between held-out evaluations (the curve).
        eval_rows: held-out rows of each domain to evaluate on.
        max_length: generation length (tokens, prompt included).
        prompts: prompts of the new domain for the greedy generations.
        seed: seeds the row order and the LoRA factors.
        update_weights: after training, the keras-lora and full runs are
            evaluated again with their learned update weighted by each of
            these (in (0, 1)): the adapter re-weighted by
            `add_weighted_adapter`, full fine-tuning's weights interpolated
            between the base's and its own (WiSE-FT). Empty: none.
    """

    out: str
    steps: int = 120
    batch: int = 8
    seq: int = 128
    runs: tuple[str, ...] = RUNS
    lora_rank: int = 1
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    embedding_rank: int | None = 4
    embedding_alpha: float | None = 1.0
    # Each run's rate is the best held-out loss of those measured at the
    # default settings (README, "The main job"): LoRA 5e-3 (2e-2: worse),
    # full 1e-3 (5e-4 and 2e-3: worse); enable_lora scales its update by 1,
    # not alpha/rank = 8, so it needs a larger rate; PEFT computes what
    # keras-lora does.
    lora_learning_rate: float = 5e-3
    full_learning_rate: float = 1e-3
    builtin_learning_rate: float = 2e-2
    peft_learning_rate: float = 5e-3
    eval_every: int = 20
    eval_rows: int = 64
    max_length: int = 48
    prompts: tuple[str, ...] = PROMPTS
    seed: int = 0
    update_weights: tuple[float, ...] = (0.8, 0.7, 0.6)

    def __post_init__(self):
        for name in ("steps", "batch", "seq", "lora_rank", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "lora_alpha",
            "lora_learning_rate",
            "full_learning_rate",
            "builtin_learning_rate",
            "peft_learning_rate",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.embedding_rank is not None and (
            isinstance(self.embedding_rank, bool)
            or not isinstance(self.embedding_rank, int)
            or self.embedding_rank < 1
        ):
            raise ValueError(
                f"embedding_rank must be a positive integer or None, got "
                f"{self.embedding_rank!r}"
            )
        if self.embedding_alpha is not None and not self.embedding_alpha > 0:
            raise ValueError("embedding_alpha must be positive or None")
        if not 2 <= self.eval_rows:
            raise ValueError("eval_rows must be at least 2")
        if isinstance(self.lora_targets, str):
            raise ValueError(
                "lora_targets must be a sequence of targets, e.g. "
                f"('query', 'value'), not the string {self.lora_targets!r}"
            )
        bad = [r for r in self.runs if r not in RUNS]
        if bad:
            raise ValueError(f"unknown quality run {bad}: choose from {RUNS}")
        runs = ("lora", "full", *(r for r in RUNS[2:] if r in self.runs))
        object.__setattr__(self, "runs", runs)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        weights = self.update_weights
        if not isinstance(weights, (list, tuple)) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < 1
            for w in weights
        ):
            raise ValueError(
                "update_weights must be numbers in (0, 1), e.g. (0.8, 0.7, 0.6); "
                f"got {weights!r}"
            )
        object.__setattr__(self, "update_weights", tuple(float(w) for w in weights))

    def learning_rate(self, run: str) -> float:
        """The AdamW learning rate of `run`."""
        return getattr(self, f"{run}_learning_rate")


def _evaluate(lm, rows, batch: int) -> float:
    x, y = pretrain.as_inputs(rows)
    result = lm.evaluate(x, y, batch_size=batch, verbose=0, return_dict=True)
    return float(result["loss"])


def _generate(lm, tokenizer, config: QualityConfig) -> list[str]:
    import keras_hub

    # A second task model on the same backbone (LoRA layers included), with
    # a preprocessor: the training model takes token ids.
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=config.max_length
    )
    generator = keras_hub.models.GPT2CausalLM(
        backbone=lm.backbone, preprocessor=preprocessor
    )
    generator.compile(sampler="greedy")
    out = generator.generate(
        list(config.prompts), max_length=config.max_length, stop_token_ids=None
    )
    return [str(o) for o in out]


def _directory_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _reset_peak() -> None:
    try:
        reset_host_peak_rss()
    except OSError:
        pass  # Not Linux: the peak then covers the whole process so far.


def missing_peft_modules() -> list[str]:
    """The modules the PEFT run needs that are not installed."""
    return [
        m for m in ("torch", "transformers", "peft") if not importlib.util.find_spec(m)
    ]


def _inject(lm, config: QualityConfig) -> None:
    """keras-lora's LoRA on `config.lora_targets`, embeddings at their rank."""
    from keras_lora import inject_lora, target_layers, wrap_layers

    if config.embedding_rank is None and config.embedding_alpha is None:
        inject_lora(
            lm,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            targets=config.lora_targets,
            seed=config.seed,
        )
        return
    # Per-layer settings: `wrap_layers` is what `inject_lora` calls.
    projection = {"rank": config.lora_rank, "alpha": config.lora_alpha}
    embedding = {
        "rank": config.embedding_rank or config.lora_rank,
        "alpha": config.embedding_alpha or config.lora_alpha,
    }
    wrap_layers(
        lm,
        {
            id(layer): (
                embedding if isinstance(layer, keras.layers.Embedding) else projection
            )
            | {"seed": config.seed}
            for layer in target_layers(lm, config.lora_targets)
        },
    )


def _lora_settings(config: QualityConfig) -> dict:
    settings = {
        "rank": config.lora_rank,
        "alpha": config.lora_alpha,
        "targets": list(config.lora_targets),
    }
    if GPT2.embedding in config.lora_targets:
        settings["embedding_rank"] = config.embedding_rank or config.lora_rank
        settings["embedding_alpha"] = config.embedding_alpha or config.lora_alpha
    return settings


def _prepare(lm, name: str, config: QualityConfig) -> int:
    """Turn the base into run `name`; its trainable parameter count."""
    import numpy as np

    from keras_lora import trainable_summary

    if name == "lora":
        _inject(lm, config)
        return int(trainable_summary(lm)["trainable"])
    if name == "builtin":
        # keras-hub's own LoRA (scale 1: it takes no alpha) on the same
        # projections, by layer name; embeddings are not among its targets.
        names = [t for t in config.lora_targets if t in GPT2.roles]
        lm.backbone.enable_lora(config.lora_rank, target_layer_names=names)
    return int(sum(int(np.prod(w.shape)) for w in lm.trainable_weights))


def _saved_bytes(lm, name: str, out: str, total_params: int) -> int:
    from keras_lora import save_adapter

    if name == "lora":
        return _directory_bytes(save_adapter(lm, os.path.join(out, "quality_adapter")))
    if name == "builtin":
        with tempfile.TemporaryDirectory() as tmp:
            lm.backbone.save_lora_weights(os.path.join(tmp, "adapter.lora.h5"))
            return _directory_bytes(tmp)
    return 4 * total_params  # The whole float32 model is the "adapter".


def _keras_run(name: str, config: QualityConfig, rows: dict, tokenizer, generations):

    keras.utils.set_random_seed(config.seed)
    lm = pretrain.load_pretrained(config.seq, with_preprocessor=False)
    total_params = lm.count_params()
    trainable = _prepare(lm, name, config)
    rate = config.learning_rate(name)
    optimizer, loss = training.optimizer_and_loss(rate)
    lm.compile(optimizer=optimizer, loss=loss)
    if "before" not in generations:
        generations["before"] = _generate(lm, tokenizer, config)
    heldout_before = _evaluate(lm, rows["code_heldout"], config.batch)
    original_before = _evaluate(lm, rows["doc_heldout"], config.batch)
    print(f"[{name}] held-out code loss before {heldout_before:.4f}", flush=True)
    train_x, train_y = pretrain.as_inputs(rows["train"])
    # Full fine-tuning's weighted update needs the base weights back.
    base_weights = [v.numpy() for v in lm.trainable_weights] if name == "full" else []
    curve = [(0, heldout_before)]
    log = training.StepLog()
    _reset_peak()
    for start in range(0, config.steps, config.eval_every):
        stop = min(config.steps, start + config.eval_every)
        lo, hi = start * config.batch, stop * config.batch
        lm.fit(
            {k: v[lo:hi] for k, v in train_x.items()},
            train_y[lo:hi],
            batch_size=config.batch,
            epochs=1,
            shuffle=False,
            callbacks=[log],
            verbose=0,
        )
        curve.append((stop, _evaluate(lm, rows["code_heldout"], config.batch)))
        print(f"[{name}] step {stop}: held-out code loss {curve[-1][1]:.4f}")
    peak = host_peak_rss_bytes()
    original_after = _evaluate(lm, rows["doc_heldout"], config.batch)
    generations[name] = _generate(lm, tokenizer, config)
    # The first step compiles; the median of the rest is the step time.
    times = sorted(log.step_times[1:] or log.step_times)
    run = {
        "trainable_params": trainable,
        "heldout_before": heldout_before,
        "heldout_after": curve[-1][1],
        "original_domain_before": original_before,
        "original_domain_after": original_after,
        "total_params": int(total_params),
        "learning_rate": rate,
        "step_seconds": times[len(times) // 2],
        "peak_memory_bytes": int(peak),
        "saved_bytes": int(_saved_bytes(lm, name, config.out, total_params)),
        "heldout_curve": curve,
        "train_loss_per_step": log.losses,
    }
    if name == "lora":
        run["lora"] = _lora_settings(config)
    elif name == "builtin":
        run["lora"] = {"rank": config.lora_rank, "alpha": config.lora_rank}
    if name in ("lora", "full"):
        run[WEIGHTED] = _weighted_update(lm, name, config, rows, base_weights)
    del lm
    keras.backend.clear_session(free_memory=True)
    return run


def _weighted_update(lm, name: str, config: QualityConfig, rows, base_weights):
    """Held-out losses of trained run `name` with its update weighted by
    each of `config.update_weights` (learning vs forgetting, one dial).

    keras-lora's adapter is re-weighted as a user would, with
    `add_weighted_adapter` (the update times w, exactly) and
    `set_adapter`; full fine-tuning's weights become W0 + w (W1 - W0),
    between the base's and its own (WiSE-FT). Runs last: it changes `lm`.
    """
    from keras_lora import add_weighted_adapter, set_adapter

    if name == "full":
        variables = list(lm.trainable_weights)
        trained = [v.numpy() for v in variables]
    sweep = []
    for i, weight in enumerate(config.update_weights):
        if name == "lora":
            with warnings.catch_warnings():
                # A new adapter (and the first switch, which adds the
                # layers' adapter gates) warns that the trained model must
                # be compiled again, which it is here.
                warnings.simplefilter("ignore", UserWarning)
                add_weighted_adapter(lm, ["default"], [weight], f"weighted_{i}")
                set_adapter(lm, f"weighted_{i}")
            lm.compile(loss=lm.loss)  # Evaluation only: the same loss.
        else:
            for v, w0, w1 in zip(variables, base_weights, trained, strict=True):
                v.assign(w0 + weight * (w1 - w0))
        sweep.append(
            {
                "weight": weight,
                "heldout": _evaluate(lm, rows["code_heldout"], config.batch),
                "original_domain": _evaluate(lm, rows["doc_heldout"], config.batch),
            }
        )
        point = sweep[-1]
        print(
            f"[{name}] update x {weight:g}: held-out code loss "
            f"{point['heldout']:.4f}, docstrings {point['original_domain']:.4f}",
            flush=True,
        )
    return sweep


def _peft_embedding_spec(config: QualityConfig) -> dict:
    """PEFT's side of a tied token-embedding adapter: the embedding and
    its tied head, at the embedding's rank and alpha, tied by PEFT's
    `ensure_weight_tying` (what `export_peft` writes)."""
    if GPT2.embedding not in config.lora_targets:
        return {}
    modules = [GPT2.hf_embedding, *sorted(set(GPT2.hf_output_heads.values()))]
    return {
        "tied_embedding_modules": modules,
        "embedding_rank": config.embedding_rank or config.lora_rank,
        "embedding_alpha": config.embedding_alpha or config.lora_alpha,
    }


def _peft_run(config: QualityConfig, rows_path: str, tokenizer, generations):
    """PEFT in a child process on the base's Hugging Face export."""
    from keras_lora import export_hf_model
    from keras_lora.bench.peft_run import peft_target_modules

    hf_dir = os.path.join(config.out, "quality_hf_base")
    export_hf_model(
        pretrain.load_pretrained(config.seq, with_preprocessor=False), hf_dir
    )
    keras.backend.clear_session(free_memory=True)
    start_id = int(tokenizer.start_token_id)
    prompt_ids = [
        [start_id, *(int(i) for i in keras.ops.convert_to_numpy(tokenizer(p)))]
        for p in config.prompts
    ]
    roles = [t for t in config.lora_targets if t in GPT2.roles]
    spec = {
        "hf_dir": hf_dir,
        "rows": rows_path,
        "prompt_ids": prompt_ids,
        "target_modules": peft_target_modules(roles),
        "rank": config.lora_rank,
        "alpha": config.lora_alpha,
        **_peft_embedding_spec(config),
        "learning_rate": config.peft_learning_rate,
        "batch": config.batch,
        "steps": config.steps,
        "eval_every": config.eval_every,
        "max_length": config.max_length,
        "seed": config.seed,
    }
    spec_path = os.path.join(config.out, "quality_peft.spec.json")
    result_path = os.path.join(config.out, "quality_peft.json")
    log_path = os.path.join(config.out, "quality_peft.log")
    atomic_write(spec_path, json.dumps(spec, indent=2).encode("utf-8"))
    if os.path.exists(result_path):
        os.remove(result_path)
    print("[peft] training in a child process (torch)", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "keras_lora.recipes.quality_peft",
                spec_path,
                result_path,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode or not os.path.exists(result_path):
        print(f"[peft] failed (exit {proc.returncode}); see {log_path}", flush=True)
        return None
    with open(result_path) as f:
        run = json.load(f)
    generations["peft"] = [
        str(tokenizer.detokenize(ids[1:])) for ids in run.pop("generations_ids")
    ]
    print(
        f"[peft] held-out code loss {run['heldout_before']:.4f} -> "
        f"{run['heldout_after']:.4f}",
        flush=True,
    )
    return run


def _against_full(run: dict, point: dict, full_gain: float, full_forget: float):
    """One weighted-update point of `run` as recovery and forgetting
    against full fine-tuning's (unweighted) gain and forgetting."""
    gain = run["heldout_before"] - point["heldout"]
    forget = point["original_domain"] - run["original_domain_before"]
    return {
        "weight": point["weight"],
        "recovery": gain / full_gain if full_gain > 0 else None,
        "forgetting_ratio": forget / full_forget if full_forget > 0 else None,
    }


def _summary(runs: dict) -> dict:
    gain = {k: v["heldout_before"] - v["heldout_after"] for k, v in runs.items()}
    forget = {
        k: v["original_domain_after"] - v["original_domain_before"]
        for k, v in runs.items()
    }
    full_gain, full_forget = gain["full"], forget["full"]
    lora = runs["lora"]
    return {
        "recovery": gain["lora"] / full_gain if full_gain > 0 else None,
        "recovery_per_run": {
            k: (g / full_gain if full_gain > 0 else None) for k, g in gain.items()
        },
        "forgetting": forget,
        "forgetting_ratio": (forget["lora"] / full_forget if full_forget > 0 else None),
        "forgetting_ratio_per_run": {
            k: (f / full_forget if full_forget > 0 else None) for k, f in forget.items()
        },
        WEIGHTED: {
            k: [_against_full(v, p, full_gain, full_forget) for p in v[WEIGHTED]]
            for k, v in runs.items()
            if WEIGHTED in v
        },
        "lora_param_fraction": lora["trainable_params"] / lora["total_params"],
        "full_trainable_params": runs["full"]["trainable_params"],
    }


def quality(config: QualityConfig) -> dict:
    """Fine-tune the pretrained base on Python code with each run of `config.runs`.

    Args:
        config: what to run.

    Returns:
        The content of `quality.json` (also written into `config.out`),
        `{"base": ..., "runs": {"lora": ..., "full": ..., ...}, ...}`, plus
        the loss plot `quality_loss.png`. A PEFT run that was skipped or
        failed is absent from `runs` and named in `skipped`.

    Raises:
        ValueError: for a corrupted base model or too little data.
    """
    import numpy as np

    started = time.perf_counter()
    os.makedirs(config.out, exist_ok=True)
    base = pretrain.load_pretrained(config.seq)  # Verifies the checksums.
    tokenizer = base.preprocessor.tokenizer
    del base
    code_train, code_heldout = data.python_code_split()
    _, doc_heldout = data.docstring_split()
    windows = data.token_windows(
        code_train, tokenizer, config.seq + 1, shuffle_seed=config.seed
    )
    order = np.random.default_rng(config.seed).integers(
        0, len(windows), size=config.steps * config.batch
    )
    rows = {
        "train": windows[order],
        "code_heldout": data.token_windows(
            code_heldout, tokenizer, config.seq + 1, max_rows=config.eval_rows
        ),
        "doc_heldout": data.token_windows(
            doc_heldout, tokenizer, config.seq + 1, max_rows=config.eval_rows
        ),
    }
    card = pretrain.read_card(pretrain.ASSETS)

    runs: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    generations: dict[str, list[str]] = {}
    for name in config.runs:
        if name != "peft":
            runs[name] = _keras_run(name, config, rows, tokenizer, generations)
            continue
        missing = missing_peft_modules()
        if missing:
            skipped["peft"] = f"{', '.join(missing)} not installed"
            print(f"(skipping the PEFT run: {skipped['peft']})", flush=True)
            continue
        rows_path = os.path.join(config.out, "quality_rows.npz")
        with open(rows_path, "wb") as f:
            np.savez(f, **rows)
        run = _peft_run(config, rows_path, tokenizer, generations)
        if run is None:
            skipped["peft"] = "the PEFT child process failed (quality_peft.log)"
        else:
            runs["peft"] = run

    result = {
        "base": {
            "description": pretrain.description(card),
            "weights": pretrain.description(card),
            "tokenizer": pretrain.tokenizer_description(card),
            "original_domain": card["corpus"],
            "new_domain": data.code_description(),
            "parameters": card["parameters"],
            "sha256": pretrain.DIGESTS["model.safetensors"],
        },
        "runs": runs,
        "skipped": skipped,
        "summary": _summary(runs),
        "settings": dataclasses.asdict(config) | {"out": None},
        "prompts": list(config.prompts),
        "generations": generations,
        "train_rows": int(len(windows)),
        "seconds": round(time.perf_counter() - started, 1),
        "backend": keras.backend.backend(),
    }
    atomic_write(
        os.path.join(config.out, "quality.json"),
        json.dumps(result, indent=2).encode("utf-8"),
    )
    plot_curves(runs, os.path.join(config.out, "quality_loss.png"))
    return result


def plot_curves(runs: dict, path: str) -> str | None:
    """Held-out loss on the new domain over steps, one line per run."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        steps, losses = zip(*run["heldout_curve"], strict=True)
        label = f"{LABELS[name]} (lr {run['learning_rate']:g}, "
        label += f"{run['trainable_params']:,} "
        ax.plot(steps, losses, marker="o", label=label + "trainable)")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy (Python code)")
    ax.set_title("keras-lora's small GPT-2 fine-tuned on Python code", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _gb(run: dict) -> str:
    peak = run.get("peak_memory_bytes")
    return "-" if peak is None else f"{peak / 2**30:.2f} GB"


def _ratio(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _dial_cell(point: dict) -> str:
    # A digit more than elsewhere: a point near a target (80%, 0.5x) must
    # not round onto it.
    share, ratio = point["recovery"], point["forgetting_ratio"]
    return ("-" if share is None else f"{100 * share:.1f}%") + (
        ", -" if ratio is None else f", {ratio:.3f}x"
    )


def _weighted_markdown(summary: dict) -> list[str]:
    """Learning vs forgetting as the learned update is weighted down."""
    sweeps = summary.get(WEIGHTED, {})
    if not sweeps.get("lora"):
        return []
    rows = [
        "Learning vs forgetting, one dial: after training, keras-lora's "
        "adapter re-weighted by w (`add_weighted_adapter(model, "
        '["default"], [w], name)`, then `set_adapter`) and full fine-tuning\'s '
        "weights interpolated, W0 + w (W1 - W0) (WiSE-FT); recovery and "
        "forgetting against full fine-tuning at w = 1:",
        "",
        "| w | "
        + " | ".join(f"{LABELS[k]}: recovery, forgetting" for k in sweeps)
        + " |",
        "|---|" + "---|" * len(sweeps),
    ]
    # Each run's column: the run as trained (w = 1), then its weighted points.
    columns = [
        [
            {
                "weight": 1.0,
                "recovery": summary["recovery_per_run"][k],
                "forgetting_ratio": summary["forgetting_ratio_per_run"][k],
            },
            *sweep,
        ]
        for k, sweep in sweeps.items()
    ]
    for points in zip(*columns, strict=True):
        cells = [_dial_cell(p) for p in points]
        rows.append(f"| {points[0]['weight']:g} | " + " | ".join(cells) + " |")
    return [*rows, ""]


def markdown(result: dict) -> list[str]:
    """The quality section of report.md, as lines."""
    runs, summary, base = result["runs"], result["summary"], result["base"]
    recovery = summary.get("recovery_per_run", {})
    forgetting = summary.get("forgetting_ratio_per_run", {})
    rows = [
        "| run | learning rate | trainable params | held-out code loss "
        "(perplexity) before -> after | recovery of full's gain | docstrings "
        "loss before -> after (forgetting vs full) | step time | peak memory "
        "(host RSS of the process, runtime included) | saved size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        fraction = run["trainable_params"] / run["total_params"]
        rows.append(
            f"| {LABELS[name]} | {run['learning_rate']:g} | "
            f"{run['trainable_params']:,} ({100 * fraction:.2f}%) | "
            f"{run['heldout_before']:.3f} ({math.exp(run['heldout_before']):.0f}) "
            f"-> {run['heldout_after']:.3f} ({math.exp(run['heldout_after']):.0f})"
            f" | {_ratio(recovery.get(name))} | "
            f"{run['original_domain_before']:.3f} -> "
            f"{run['original_domain_after']:.3f} ({_ratio(forgetting.get(name))}) | "
            f"{1000 * run['step_seconds']:.0f} ms | {_gb(run)} | "
            f"{run['saved_bytes'] / 1e6:.2f} MB |"
        )
    lora = runs["lora"]["lora"]
    settings = result["settings"]
    ratio = summary["forgetting_ratio"]
    lines = [
        "## Quality: LoRA vs full fine-tuning of a pretrained model",
        "",
        f"- base weights: {base['weights']}",
        f"- tokenizer: {base['tokenizer']}",
        f"- original domain: {base['original_domain']}",
        f"- new domain: {base['new_domain']}",
        f"- keras-lora LoRA rank {lora['rank']}, alpha {lora['alpha']:g}, "
        f"targets {', '.join(lora['targets'])}"
        + (
            f" (token embedding: rank {lora['embedding_rank']}, alpha "
            f"{lora['embedding_alpha']:g}; its update also feeds the tied "
            "output head)"
            if "embedding_rank" in lora
            else ""
        )
        + f"; {settings['steps']} steps of "
        f"{settings['batch']} x {settings['seq']} tokens for each run, same rows "
        "in the same order, AdamW (weight decay 0.01, gradient norm clipped at "
        "1) at each run's learning rate; losses are mean token cross-entropy on "
        f"{settings['eval_rows']} held-out rows of each domain",
        "- keras-hub enable_lora: the same projections and rank, scale 1 (it "
        "takes no alpha); it factors the (hidden, heads, head_dim) query, key "
        "and value kernels as (hidden, heads, rank) x (rank, head_dim) and "
        "trains the wrapped layers' biases too, hence more parameters; HF "
        "PEFT: the same weights exported with "
        "`export_hf_model`, loaded by transformers, PEFT LoRA of the same rank "
        "and alpha on the Hugging Face modules of those projections (GPT-2 "
        "fuses query, key and value into one `c_attn`, adapted whole), torch, "
        "in its own process",
        *(
            ["- keras-hub enable_lora and HF PEFT adapt the projections only"]
            if "embedding_rank" in lora
            else []
        ),
        *(f"- {LABELS[k]} skipped: {why}" for k, why in result["skipped"].items()),
        "",
        *rows,
        "",
        (
            f"keras-lora's LoRA recovers {_ratio(summary['recovery'])} of full "
            "fine-tuning's held-out improvement with "
            f"{100 * summary['lora_param_fraction']:.2f}% of the parameters"
            if summary["recovery"] is not None
            else "Full fine-tuning did not improve the held-out loss"
        )
        + (
            f"; it forgets {_ratio(ratio)} as much of the original domain "
            f"(loss +{summary['forgetting']['lora']:.3f} vs "
            f"+{summary['forgetting']['full']:.3f})."
            if ratio is not None
            else "."
        ),
        "",
        *_weighted_markdown(summary),
        "![held-out loss](quality_loss.png)",
        "",
        "Greedy generations from prompts of the new domain:",
        "",
    ]
    for i, prompt in enumerate(result["prompts"]):
        lines.append(f"- `{prompt!r}`")
        for name in ("before", *runs):
            label = "base, before" if name == "before" else LABELS[name]
            lines.append(f"  - {label}: `{result['generations'][name][i]!r}`")
    return [*lines, ""]
