"""The demo quality part's PEFT run: Hugging Face PEFT LoRA on torch.

Runs in a child process (`python -m keras_lora.recipes.quality_peft SPEC
RESULT`), so torch never shares a process with the Keras backend. It loads
keras-lora's pretrained base through its Hugging Face export
(`export_hf_model`) and trains on exactly the token rows the Keras runs
train on (`rows.npz` written by `recipes.quality`), with the same AdamW
settings (weight decay 0.01, epsilon 1e-6, global gradient clipping at 1.0),
then reports the same held-out losses and greedy generations (token ids; the
parent detokenizes them with the shared tokenizer).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from keras_lora.callbacks import host_peak_rss_bytes, reset_host_peak_rss
from keras_lora.files import atomic_write
from keras_lora.optional import require


def _mean_loss(model, rows, batch: int, torch) -> float:
    losses = []
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = torch.from_numpy(rows[start : start + batch].astype("int64"))
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            losses.append(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1)
                ).item()
            )
    return statistics.fmean(losses)


def _greedy(model, prompts: list[list[int]], max_length: int, torch) -> list[list[int]]:
    # A plain argmax loop to `max_length` tokens, like keras-hub's greedy
    # sampler with no stop token: no generation-config defaults involved.
    out = []
    with torch.no_grad():
        for ids in prompts:
            ids = torch.tensor([ids], dtype=torch.int64)
            while ids.shape[1] < max_length:
                logits = model(input_ids=ids).logits[0, -1]
                ids = torch.cat([ids, logits.argmax().reshape(1, 1)], dim=1)
            out.append([int(i) for i in ids[0]])
    return out


def peft_quality_run(spec: dict) -> dict:
    """Train PEFT LoRA on the rows in `spec["rows"]`; the run's numbers.

    Args:
        spec: `hf_dir` (the exported base), `rows` (npz with `train`,
            `code_heldout`, `doc_heldout`), `prompt_ids`, `target_modules`,
            `rank`, `alpha`, `learning_rate`, `batch`, `steps`,
            (for a tied token-embedding adapter) `tied_embedding_modules`,
            `embedding_rank`, `embedding_alpha`,
            `eval_every`, `max_length`, `seed`.

    Returns:
        The run's entry of quality.json, plus `generations_ids`.
    """
    import numpy as np

    peft = require("peft", extra="hf")
    torch = require("torch", extra="torch")
    transformers = require("transformers", extra="hf")

    torch.manual_seed(spec["seed"])
    rows = np.load(spec["rows"])
    train, code, doc = rows["train"], rows["code_heldout"], rows["doc_heldout"]
    model = transformers.GPT2LMHeadModel.from_pretrained(spec["hf_dir"])
    tied = spec.get("tied_embedding_modules", [])
    total = sum(p.numel() for p in model.parameters())
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=spec["rank"],
            lora_alpha=spec["alpha"],
            lora_dropout=0.0,
            target_modules=[*spec["target_modules"], *tied],
            # The embedding and its tied head at their own rank and alpha,
            # one adapter shared by both (as keras-lora's tied head).
            rank_pattern={m: spec["embedding_rank"] for m in tied},
            alpha_pattern={m: spec["embedding_alpha"] for m in tied},
            ensure_weight_tying=bool(tied),
            fan_in_fan_out=True,  # GPT-2's Conv1D keeps weights (in, out).
            bias="none",
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=spec["learning_rate"], weight_decay=0.01, eps=1e-6
    )
    batch = spec["batch"]
    model.eval()
    before = _mean_loss(model, code, batch, torch)
    original_before = _mean_loss(model, doc, batch, torch)
    try:
        reset_host_peak_rss()
    except OSError:
        pass  # Not Linux: the peak then covers the whole process.
    curve, losses, step_times = [(0, before)], [], []
    for step in range(spec["steps"]):
        model.train()
        chunk = torch.from_numpy(
            train[step * batch : (step + 1) * batch].astype("int64")
        )
        start = time.perf_counter()
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # global_clipnorm=1.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_times.append(time.perf_counter() - start)
        if (step + 1) % spec["eval_every"] == 0 or step + 1 == spec["steps"]:
            model.eval()
            curve.append((step + 1, _mean_loss(model, code, batch, torch)))
    peak = host_peak_rss_bytes()
    model.eval()
    original_after = _mean_loss(model, doc, batch, torch)
    generations = _greedy(model, spec["prompt_ids"], spec["max_length"], torch)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = sum(
            os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(tmp) for n in ns
        )
    times = sorted(step_times[1:] or step_times)
    return {
        "trainable_params": int(trainable),
        "heldout_before": before,
        "heldout_after": curve[-1][1],
        "original_domain_before": original_before,
        "original_domain_after": original_after,
        "total_params": int(total),
        "learning_rate": spec["learning_rate"],
        "step_seconds": times[len(times) // 2],
        "peak_memory_bytes": int(peak),
        "saved_bytes": int(size),
        "heldout_curve": curve,
        "train_loss_per_step": losses,
        "lora": {
            "rank": spec["rank"],
            "alpha": spec["alpha"],
            "targets": [*spec["target_modules"], *tied],
            **(
                {
                    "embedding_rank": spec["embedding_rank"],
                    "embedding_alpha": spec["embedding_alpha"],
                }
                if tied
                else {}
            ),
        },
        "torch_threads": torch.get_num_threads(),
        "generations_ids": generations,
    }


def main(argv=None) -> int:
    """`python -m keras_lora.recipes.quality_peft SPEC.json RESULT.json`."""
    spec_path, result_path = argv if argv is not None else sys.argv[1:]
    with open(spec_path) as f:
        spec = json.load(f)
    result = peft_quality_run(spec)
    atomic_write(result_path, json.dumps(result).encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
