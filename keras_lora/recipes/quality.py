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

The settings are `recipes.quality_config`; the report is
`recipes.quality_report`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
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
from keras_lora.recipes import data, pretrain, tokenization, training
from keras_lora.recipes.quality_config import (
    WEIGHTED,
    QualityConfig,
)
from keras_lora.recipes.quality_report import plot_curves, summarize


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
    windows = tokenization.token_windows(
        code_train, tokenizer, config.seq + 1, shuffle_seed=config.seed
    )
    order = np.random.default_rng(config.seed).integers(
        0, len(windows), size=config.steps * config.batch
    )
    rows = {
        "train": windows[order],
        "code_heldout": tokenization.token_windows(
            code_heldout, tokenizer, config.seq + 1, max_rows=config.eval_rows
        ),
        "doc_heldout": tokenization.token_windows(
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
        "summary": summarize(runs),
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
