"""The quality part's report: the summary against full fine-tuning, the
loss plot and the report.md section, from `quality.json`'s content.
"""

from __future__ import annotations

import math

from keras_lora.recipes.quality_config import LABELS, WEIGHTED


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


def summarize(runs: dict) -> dict:
    """Each run's recovery of full fine-tuning's gain and its forgetting
    relative to full fine-tuning's (`quality.json`'s "summary").

    Args:
        runs: `quality.json`'s "runs", with "lora" and "full" among them.
    """
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


def plot_curves(runs: dict, path: str) -> str | None:
    """Held-out loss on the new domain over steps, one line per run.

    Args:
        runs: `quality.json`'s "runs".
        path: the PNG file to write.

    Returns:
        `path`, or None without matplotlib.
    """
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
    """The quality section of report.md, as lines.

    Args:
        result: `quality.json`'s content.
    """
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
