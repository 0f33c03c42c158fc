"""The outside peer: Hugging Face PEFT LoRA on a transformers GPT-2 (torch).

Same architecture (random weights), data, batch, steps and AdamW settings
as the Keras runs, with the family's Hugging Face module names as PEFT
`target_modules`.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from keras_lora.bench.common import eval_data, file_bytes, step_stats, token_data
from keras_lora.callbacks import host_peak_rss_bytes, reset_host_peak_rss
from keras_lora.families import GPT2
from keras_lora.optional import require


def peft_run(spec: dict) -> dict:
    import torch

    torch.manual_seed(spec["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = peft_model(spec, device)
    build_s = time.perf_counter() - t0
    config = model.config
    modules = peft_target_modules(spec["targets"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    train_step = peft_train_step(model, spec, device)

    tokens, labels = token_data(spec)
    tokens = torch.from_numpy(tokens.astype("int64"))
    labels = torch.from_numpy(labels.astype("int64"))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        memory_device = "cuda:0"
    else:
        _reset_host_peak()
        memory_device = "host RSS"

    step_times, cpu_times, losses = [], [], []
    b = spec["batch"]
    for step in range(spec["warmup"] + spec["steps"]):
        ids = tokens[step * b : (step + 1) * b].to(device)
        target = labels[step * b : (step + 1) * b].to(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(train_step(ids, target))
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    eval_loss = None
    held_out = eval_data(spec)
    if held_out is not None:
        model.eval()
        eval_losses = []
        with torch.no_grad():
            for start in range(0, len(held_out[0]), b):
                ids, target = (
                    torch.from_numpy(a[start : start + b].astype("int64")).to(device)
                    for a in held_out
                )
                logits = model(input_ids=ids).logits.float()
                eval_losses.append(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
                    ).item()
                )
        eval_loss = round(statistics.fmean(eval_losses), 4)

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = host_peak_rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sizes = file_bytes(tmp)
    result = {
        "trainable_params": int(trainable),
        "frozen_params": int(frozen),
        "peft_target_modules": modules,
        "build_s": round(build_s, 2),
        "memory_device": memory_device,
        "peak_memory_gb": round(peak / 2**30, 3),
        "final_loss": round(losses[-1], 4),
        "mean_loss": round(statistics.fmean(losses), 4),
        "eval_loss": eval_loss,
        "torch_threads": torch.get_num_threads(),
        # "sdpa" (torch's fused attention) or "eager"; with dropout > 0 in
        # training, torch's CPU SDPA runs its unfused math path.
        "attn_implementation": getattr(config, "_attn_implementation", None),
        **sizes,
        "adapter_source": "PeftModel.save_pretrained (safetensors)",
    }
    result.update(step_stats(step_times, cpu_times, spec))
    return result


def peft_model(spec: dict, device: str):
    """A transformers GPT-2 of the spec's architecture (random weights) with
    PEFT LoRA on the spec's targets, on `device`, in training mode."""
    peft = require("peft", extra="hf")
    transformers = require("transformers", extra="hf")

    model = transformers.GPT2LMHeadModel(gpt2_config(spec["arch"], spec.get("dropout")))
    model = peft.get_peft_model(model, lora_config(spec))
    return model.to(device).train()


def lora_config(spec: dict, **settings):
    """PEFT's `LoraConfig` for the spec's rank, alpha and targets on a
    transformers GPT-2 (no LoRA dropout, biases frozen); `settings` add to
    it (e.g. `init_lora_weights=False`)."""
    peft = require("peft", extra="hf")

    return peft.LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=0.0,
        target_modules=peft_target_modules(spec["targets"]),
        fan_in_fan_out=True,  # GPT-2's Conv1D keeps weights (in, out).
        bias="none",
        **settings,
    )


def peft_train_step(model, spec: dict, device: str):
    """`step(ids, target) -> loss`: one AdamW step as the Keras runs take
    it (global norm clipping 1.0), under torch.autocast when the spec's
    dtype policy is mixed ("mixed_bfloat16" for a bfloat16 autocast row)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=spec["learning_rate"], weight_decay=0.01, eps=1e-6
    )
    autocast_dtype = {
        "mixed_float16": torch.float16,
        "mixed_bfloat16": torch.bfloat16,
    }.get(spec["dtype_policy"] or "")
    scaler = torch.amp.GradScaler(device, enabled=autocast_dtype == torch.float16)

    def step(ids, target) -> float:
        with torch.autocast(
            device, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
        ):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1)
        )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # global_clipnorm=1.0
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # Waits for the step on an accelerator.

    return step


def gpt2_config(arch: dict, dropout: float | None = None):
    """The transformers `GPT2Config` of a benchmark architecture row; with
    `dropout`, every dropout rate (embedding, attention, residual) set to it
    as keras-hub's `GPT2Backbone(dropout=...)` does."""
    transformers = require("transformers", extra="hf")

    rates = (
        {}
        if dropout is None
        else dict.fromkeys(("embd_pdrop", "attn_pdrop", "resid_pdrop"), dropout)
    )
    return transformers.GPT2Config(
        vocab_size=arch["vocabulary_size"],
        n_positions=arch["max_sequence_length"],
        n_embd=arch["hidden_dim"],
        n_layer=arch["num_layers"],
        n_head=arch["num_heads"],
        n_inner=arch["intermediate_dim"],
        **rates,
    )


def peft_target_modules(roles) -> list[str]:
    """PEFT `target_modules` for keras-lora target roles.

    Full Hugging Face module names below a block (`Projection.hf_module`): PEFT
    matches a target against the end of each module's dotted name, so these
    pick exactly the family's modules. A fused module (query|key|value in
    one) is adapted whole, whichever of its roles was asked for.
    """
    return sorted({GPT2.projection(role).hf_module for role in roles})


def _reset_host_peak() -> None:
    try:
        reset_host_peak_rss()
    except OSError:
        pass  # Not Linux: the peak then covers the whole process.
