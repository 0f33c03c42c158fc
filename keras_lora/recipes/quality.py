"""The demo's quality part: LoRA vs full fine-tuning of a pretrained base.

keras-lora's own small pretrained GPT-2 (`recipes.pretrain`, trained on
standard-library docstrings) is fine-tuned on a clearly different domain,
Python source code (`data.python_code_split`), once with LoRA and once with
full fine-tuning: same steps, same rows in the same order, each with its
own learning rate. Held-out loss on the new domain is measured before,
during and after; held-out loss on the original domain (docstrings of
modules the base never saw) before and after, to show forgetting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import keras

from keras_lora.families import GPT2
from keras_lora.files import atomic_write
from keras_lora.recipes import data, pretrain, training

PROMPTS = ("def __init__(self, ", "    for key, value in ", "class ")
# All six projections of every block at rank 2: 18,432 parameters, 1.4% of
# the base. Query/value alone (rank 8, same budget) learned the new domain
# three times slower: the shift is in the feed-forward layers too.
LORA_TARGETS = tuple(GPT2.roles)


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """What the quality part runs; checked when made.

    Args:
        out: directory for quality.json, the loss plot and the adapter.
        steps: training steps of each run.
        batch: rows per step.
        seq: tokens per row (at most the base's 128).
        lora_rank, lora_alpha, lora_targets: the LoRA settings.
        lora_learning_rate, full_learning_rate: each run's AdamW rate.
        eval_every: steps between held-out evaluations (the curve).
        eval_rows: held-out rows of each domain to evaluate on.
        max_length: generation length (tokens, prompt included).
        prompts: prompts of the new domain for the greedy generations.
        seed: seeds the row order and the LoRA factors.
    """

    out: str
    steps: int = 120
    batch: int = 8
    seq: int = 128
    lora_rank: int = 2
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_learning_rate: float = 5e-3
    full_learning_rate: float = 5e-4
    eval_every: int = 20
    eval_rows: int = 64
    max_length: int = 48
    prompts: tuple[str, ...] = PROMPTS
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch", "seq", "lora_rank", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lora_alpha", "lora_learning_rate", "full_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if not 2 <= self.eval_rows:
            raise ValueError("eval_rows must be at least 2")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "prompts", tuple(self.prompts))


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


def quality(config: QualityConfig) -> dict:
    """Fine-tune the pretrained base on Python code with LoRA and fully.

    Args:
        config: what to run.

    Returns:
        The content of `quality.json` (also written into `config.out`),
        `{"base": ..., "runs": {"lora": ..., "full": ...}, ...}`, plus the
        loss plot `quality_loss.png`.

    Raises:
        ValueError: for a corrupted base model or too little data.
    """
    import numpy as np

    from keras_lora import inject_lora, save_adapter, trainable_summary

    started = time.perf_counter()
    os.makedirs(config.out, exist_ok=True)
    base = pretrain.load_pretrained(config.seq)  # Verifies the checksums.
    tokenizer = base.preprocessor.tokenizer
    code_train, code_heldout = data.python_code_split()
    _, doc_heldout = data.docstring_split()
    rows = data.token_windows(
        code_train, tokenizer, config.seq + 1, shuffle_seed=config.seed
    )
    code_rows = data.token_windows(
        code_heldout, tokenizer, config.seq + 1, max_rows=config.eval_rows
    )
    doc_rows = data.token_windows(
        doc_heldout, tokenizer, config.seq + 1, max_rows=config.eval_rows
    )
    order = np.random.default_rng(config.seed).integers(
        0, len(rows), size=config.steps * config.batch
    )
    train_x, train_y = pretrain.as_inputs(rows[order])
    card = pretrain._read_card(pretrain.ASSETS)

    runs: dict[str, dict] = {}
    generations: dict[str, list[str]] = {}
    for name in ("lora", "full"):
        keras.utils.set_random_seed(config.seed)
        lm = pretrain.load_pretrained(config.seq, with_preprocessor=False)
        total_params = lm.count_params()
        if name == "lora":
            inject_lora(
                lm,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                targets=config.lora_targets,
                seed=config.seed,
            )
            trainable = int(trainable_summary(lm)["trainable"])
            rate = config.lora_learning_rate
        else:
            trainable = int(sum(int(np.prod(w.shape)) for w in lm.trainable_weights))
            rate = config.full_learning_rate
        optimizer, loss = training.optimizer_and_loss(rate)
        lm.compile(optimizer=optimizer, loss=loss)
        if not generations:
            generations["before"] = _generate(lm, tokenizer, config)
        heldout_before = _evaluate(lm, code_rows, config.batch)
        original_before = _evaluate(lm, doc_rows, config.batch)
        print(f"[{name}] held-out code loss before {heldout_before:.4f}", flush=True)
        curve = [(0, heldout_before)]
        log = training.StepLog()
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
            curve.append((stop, _evaluate(lm, code_rows, config.batch)))
            print(f"[{name}] step {stop}: held-out code loss {curve[-1][1]:.4f}")
        heldout_after = curve[-1][1]
        original_after = _evaluate(lm, doc_rows, config.batch)
        generations[name] = _generate(lm, tokenizer, config)
        # The first step compiles; the median of the rest is the step time.
        times = sorted(log.step_times[1:] or log.step_times)
        if name == "lora":
            saved = save_adapter(lm, os.path.join(config.out, "quality_adapter"))
            size = _directory_bytes(saved)
        else:
            size = 4 * total_params  # The whole float32 model is the "adapter".
        runs[name] = {
            "trainable_params": trainable,
            "heldout_before": heldout_before,
            "heldout_after": heldout_after,
            "original_domain_before": original_before,
            "original_domain_after": original_after,
            "heldout_perplexity_before": float(np.exp(heldout_before)),
            "heldout_perplexity_after": float(np.exp(heldout_after)),
            "total_params": int(total_params),
            "trainable_fraction": trainable / total_params,
            "learning_rate": rate,
            "step_seconds": times[len(times) // 2],
            "saved_bytes": int(size),
            "heldout_curve": curve,
            "train_loss_per_step": log.losses,
        }
        if name == "lora":
            runs[name]["lora"] = {
                "rank": config.lora_rank,
                "alpha": config.lora_alpha,
                "targets": list(config.lora_targets),
            }
        del lm
        keras.backend.clear_session(free_memory=True)

    lora, full = runs["lora"], runs["full"]
    gain = {k: v["heldout_before"] - v["heldout_after"] for k, v in runs.items()}
    forget = {
        k: v["original_domain_after"] - v["original_domain_before"]
        for k, v in runs.items()
    }
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
        "summary": {
            "recovery": gain["lora"] / gain["full"] if gain["full"] else None,
            "forgetting": forget,
            "forgetting_ratio": (
                forget["lora"] / forget["full"] if forget["full"] > 0 else None
            ),
            "lora_param_fraction": lora["trainable_params"] / lora["total_params"],
            "full_trainable_params": full["trainable_params"],
        },
        "settings": dataclasses.asdict(config) | {"out": None},
        "prompts": list(config.prompts),
        "generations": generations,
        "train_rows": int(len(rows)),
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
        label = f"{name} (lr {run['learning_rate']:g}, {run['trainable_params']:,} "
        ax.plot(steps, losses, marker="o", label=label + "trainable)")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy (Python code)")
    ax.set_title("keras-lora's small GPT-2 fine-tuned on Python code", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(result: dict) -> list[str]:
    """The quality section of report.md, as lines."""
    runs, summary, base = result["runs"], result["summary"], result["base"]
    rows = [
        "| run | learning rate | trainable params | held-out code loss "
        "(ppl) before -> after | docstrings loss before -> after | step time "
        "| saved size |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        rows.append(
            f"| {name} | {run['learning_rate']:g} | {run['trainable_params']:,} "
            f"({100 * run['trainable_fraction']:.2f}%) | "
            f"{run['heldout_before']:.3f} ({run['heldout_perplexity_before']:.1f}) "
            f"-> {run['heldout_after']:.3f} ({run['heldout_perplexity_after']:.1f})"
            f" | {run['original_domain_before']:.3f} -> "
            f"{run['original_domain_after']:.3f} | "
            f"{1000 * run['step_seconds']:.0f} ms | "
            f"{run['saved_bytes'] / 1e6:.2f} MB |"
        )
    lora = runs["lora"]["lora"]
    settings = result["settings"]
    recovery = summary["recovery"]
    ratio = summary["forgetting_ratio"]
    lines = [
        "## Quality: LoRA vs full fine-tuning of a pretrained model",
        "",
        f"- base weights: {base['weights']}",
        f"- tokenizer: {base['tokenizer']}",
        f"- original domain: {base['original_domain']}",
        f"- new domain: {base['new_domain']}",
        f"- LoRA rank {lora['rank']}, alpha {lora['alpha']:g}, targets "
        f"{', '.join(lora['targets'])}; {settings['steps']} steps of "
        f"{settings['batch']} x {settings['seq']} tokens for each run, same rows "
        "in the same order; losses are mean token cross-entropy on "
        f"{settings['eval_rows']} held-out rows",
        "",
        *rows,
        "",
        (
            f"LoRA recovers {100 * recovery:.0f}% of full fine-tuning's held-out "
            f"improvement with {100 * summary['lora_param_fraction']:.2f}% of the "
            "parameters"
            if recovery is not None
            else "Full fine-tuning did not improve the held-out loss"
        )
        + (
            f"; it forgets {100 * ratio:.0f}% as much of the original domain "
            f"(loss +{summary['forgetting']['lora']:.3f} vs "
            f"+{summary['forgetting']['full']:.3f})."
            if ratio is not None
            else "."
        ),
        "",
        "![held-out loss](quality_loss.png)",
        "",
        "Greedy generations from prompts of the new domain:",
        "",
    ]
    for i, prompt in enumerate(result["prompts"]):
        lines.append(f"- `{prompt!r}`")
        for name in ("before", "lora", "full"):
            text = result["generations"][name][i]
            lines.append(f"  - {name}: `{text!r}`")
    return [*lines, ""]
