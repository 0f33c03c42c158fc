"""The runs of `benchmarks/e2e_bleu.py`: the shared base, three trainings, decoding.

`prepare` (in the parent, on its Keras backend) writes the Hugging Face
base and the batch order; `worker` runs one of `lora`, `full` (the Keras
backend), `trl` or `decode` (torch) in a child process from a JSON spec.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time

EOS = "<|endoftext|>"
# The shipped model has 128 positions; nothing is trained or decoded past them.
POSITIONS = 128


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _dump(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def _hf_config(path: str) -> None:
    """The exported config.json with this vocabulary's EOS and dropout 0."""
    config = _load(path)
    config.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    # keras-hub's loader picks its converter by the architecture's name.
    config.setdefault("architectures", ["GPT2LMHeadModel"])
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"):
        config[key] = 0.0
    _dump(path, config)


def write_base(base: str) -> dict:
    """keras-lora's pretrained GPT-2 as a Hugging Face directory with a
    `tokenizer.json`; how its tokenizer compares with keras-hub's."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    from keras_lora import export_hf_model
    from keras_lora.recipes import pretrain

    export_hf_model(pretrain.load_pretrained(POSITIONS, with_preprocessor=False), base)
    _hf_config(os.path.join(base, "config.json"))
    vocab = os.path.join(pretrain.ASSETS, "vocab.json")
    merges = os.path.join(pretrain.ASSETS, "merges.txt")
    tokenizer = Tokenizer(models.BPE.from_file(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # One special token, as GPT-2's own tokenizer.json has it: else the EOS
    # appended to a completion would be encoded as its characters.
    tokenizer.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    tokenizer.save(os.path.join(base, "tokenizer.json"))
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    _dump(
        os.path.join(base, "tokenizer_config.json"),
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": POSITIONS}
        | dict.fromkeys(names, EOS),
    )
    return {"card": pretrain.read_card(pretrain.ASSETS)["corpus"]}


def prepare(base: str, train: str, evals: str, out: str, settings: dict) -> dict:
    """The base directory, the encoded eval examples and the batch order.

    Returns:
        `{"order": [train.jsonl line of each batch row, in step order],
        "settings": {...what the table should say...}}`.
    """
    from keras_lora.bench.peft_run import peft_target_modules
    from keras_lora.families import GPT2
    from keras_lora.recipes.sft.batches import make_batches
    from keras_lora.recipes.sft.config import ALL_LINEAR
    from keras_lora.recipes.sft.data import read_examples
    from keras_lora.recipes.sft.encode import encode_examples
    from keras_lora.recipes.sft.inspection import prepare_data

    targets = tuple(settings.get("targets") or GPT2.default_targets)
    card = write_base(base)
    config = _sft_config(settings | {"base": base, "train": train, "eval": evals}, out)
    tokenizer, _, data = prepare_data(config)
    pad = tokenizer.tokenizer.token_to_id(EOS)
    batches = make_batches(
        data.examples, config.batch, config.total_steps(0), pad, config.seed
    )
    # The order make_batches chose, as train.jsonl lines (identical texts
    # encode identically, so any of their lines is the same example).
    lines = {}
    for example in data.examples:
        lines.setdefault(tuple(example.input_ids), example.line)
    order = [
        lines[tuple(int(t) for t in ids[: int(mask.sum())])]
        for ids, mask in zip(
            batches.x["token_ids"], batches.x["padding_mask"], strict=True
        )
    ]
    held = encode_examples(
        read_examples(evals), tokenizer, max_length=config.max_length, loss_on="answers"
    )
    with open(os.path.join(out, "data", "eval_encoded.jsonl"), "w") as f:
        for e in held.examples:
            f.write(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n")
    return {
        "order": order,
        "settings": {
            "base_model": "keras-lora's pretrained GPT-2 (keras_lora/recipes/assets: "
            "4 layers, hidden 128, 128 positions, vocabulary 4096, 1.33M "
            f"parameters), trained on {card['card']}",
            "lora_targets": list(targets),
            # PEFT's own all-linear picks every Linear/Conv1D but the head;
            # the trl run adapts projections only (no token embedding).
            "peft_target_modules": (
                "all-linear"
                if ALL_LINEAR in targets
                else peft_target_modules([t for t in targets if t != GPT2.embedding])
            ),
            "full_frozen": list(settings.get("full_freeze") or []),
            "train_data": data.report(),
            "eval_data": held.report(),
            "padding_fraction": round(batches.padding_fraction, 4),
        },
    }


def _sft_config(spec: dict, out: str, **changes):
    from keras_lora.recipes.sft.config import SftConfig

    config = SftConfig(
        model=spec["base"],
        data=spec["train"],
        out=out,
        eval_data=spec["eval"],
        max_length=spec["max_length"],
        rank=spec["rank"],
        alpha=spec["alpha"],
        steps=spec["steps"],
        batch=spec["batch"],
        learning_rate=spec["learning_rate"],
        seed=spec["seed"],
        targets=tuple(spec["targets"]) if spec.get("targets") else None,
        # One padded length: the order `make_batches` gives, which the full
        # fine-tuning and TRL runs are handed (buckets would reorder steps).
        buckets="off",
    )
    return dataclasses.replace(config, **changes)


def _summary(losses: list[float], seconds: float, trainable: int) -> dict:
    tail = losses[-20:]
    return {
        "trainable_params": int(trainable),
        "train_seconds": round(seconds, 1),
        "train_loss_first": round(losses[0], 4),
        "train_loss_last20": round(statistics.fmean(tail), 4),
    }


def run_lora(spec: dict) -> dict:
    """keras-lora's `sft` recipe (LoRA) on the training file."""
    from keras_lora.recipes.sft.run import train

    out = os.path.join(spec["out"], "lora")
    start = time.perf_counter()
    rate = spec.get("lora_learning_rate") or spec["learning_rate"]
    report = train(_sft_config(spec, out, learning_rate=rate))
    seconds = time.perf_counter() - start
    summary = _summary(
        report["train_loss"], seconds, report["settings"]["trainable_params"]
    )
    summary["sft_eval_loss_after"] = round(report["eval_loss_after"], 4)
    return {
        "model": {"peft": os.path.join(out, "peft")},
        "summary": summary,
        "train_loss": report["train_loss"],
    }


def run_full(spec: dict) -> dict:
    """The `sft` recipe's loop (data, batches, loss, optimizer), every weight
    trained."""
    import keras

    from keras_lora import export_hf_model
    from keras_lora.recipes.sft.batches import make_batches
    from keras_lora.recipes.sft.data import read_examples
    from keras_lora.recipes.sft.encode import encode_examples
    from keras_lora.recipes.sft.evaluation import eval_loss
    from keras_lora.recipes.sft.inspection import prepare_data
    from keras_lora.recipes.sft.run import load_causal_lm, make_optimizer
    from keras_lora.recipes.training import StepLog

    out = os.path.join(spec["out"], "full")
    config = _sft_config(spec, out, learning_rate=spec["full_learning_rate"])
    tokenizer, _, data = prepare_data(config)
    pad = tokenizer.tokenizer.token_to_id(EOS)
    held = encode_examples(
        read_examples(config.eval_data), tokenizer, max_length=config.max_length
    ).examples
    batches = make_batches(
        data.examples, config.batch, config.total_steps(0), pad, config.seed
    )
    keras.utils.set_random_seed(config.seed)
    lm = load_causal_lm(config.model)
    for name in spec.get("full_freeze") or []:  # Kept at the base's weights.
        lm.backbone.get_layer(name).trainable = False
    lm.compile(
        optimizer=make_optimizer(config),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum"
        ),
    )
    steps = StepLog()
    start = time.perf_counter()
    lm.fit(
        batches.x,
        batches.y,
        sample_weight=batches.sample_weight,
        batch_size=config.batch,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[steps],
    )
    seconds = time.perf_counter() - start
    after = eval_loss(lm, held, config.batch, pad)
    hf = os.path.join(out, "hf")
    export_hf_model(lm, hf)
    shutil.copy(os.path.join(spec["base"], "config.json"), hf)
    trainable = sum(math.prod(w.shape) for w in lm.trainable_weights)
    summary = _summary(steps.losses, seconds, trainable)
    summary["sft_eval_loss_after"] = round(after, 4)
    return {"model": {"hf": hf}, "summary": summary, "train_loss": steps.losses}


def run_trl(spec: dict) -> dict:
    """TRL's `SFTTrainer` + PEFT LoRA on torch, the same examples in the same
    order (a sequential sampler over them)."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    torch.manual_seed(spec["seed"])
    torch.set_flush_denormal(True)
    with open(spec["train"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    ordered = [records[line - 1] for line in spec["order"]]
    out = os.path.join(spec["out"], "trl")
    args = trl.SFTConfig(
        output_dir=os.path.join(out, "trainer"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        learning_rate=spec.get("lora_learning_rate") or spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.004,  # Keras AdamW's defaults, as the Keras runs use.
        adam_epsilon=1e-7,
        max_grad_norm=0.0,  # Keras's runs do not clip.
        optim="adamw_torch",
        seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=spec["max_length"],
        train_sampling_strategy="sequential",
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
        target_modules=spec["peft_target_modules"],
        fan_in_fan_out=True,  # GPT-2's Conv1D keeps weights (in, out).
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = trl.SFTTrainer(
        model=transformers.GPT2LMHeadModel.from_pretrained(spec["base"]),
        args=args,
        train_dataset=datasets.Dataset.from_list(ordered),
        processing_class=transformers.AutoTokenizer.from_pretrained(spec["base"]),
        peft_config=lora,
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapter = os.path.join(out, "peft")
    trainer.model.save_pretrained(adapter)
    return {
        "model": {"peft": adapter},
        "summary": _summary(losses, seconds, trainable),
        "train_loss": losses,
    }


def run_decode(spec: dict) -> dict:
    """Greedy generations and eval losses of every model, in transformers."""
    import peft
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["base"])
    eos = tokenizer.convert_tokens_to_ids(EOS)
    with open(os.path.join(spec["out"], "data", "eval_encoded.jsonl")) as f:
        encoded = [json.loads(line) for line in f]
    prompts = [tokenizer(p)["input_ids"] for p in spec["prompts"]]
    generations, losses = {}, {}
    for name, where in spec["models"].items():
        model = transformers.GPT2LMHeadModel.from_pretrained(
            where.get("hf", spec["base"])
        )
        if "peft" in where:
            model = peft.PeftModel.from_pretrained(model, where["peft"])
            # A tied embedding's adapter stays unmerged: PEFT 0.21's
            # merge_and_unload adds its update to the shared table twice
            # (through wte and through lm_head), and warns that it may.
            if not model.peft_config["default"].ensure_weight_tying:
                model = model.merge_and_unload()
        model.eval()
        total = count = 0.0
        texts = []
        with torch.no_grad():
            for example in encoded:
                ids = torch.tensor([example["input_ids"]])
                labels = torch.tensor(example["labels"][1:])
                logits = model(input_ids=ids).logits[0, :-1].float()
                keep = labels != -100
                total += torch.nn.functional.cross_entropy(
                    logits[keep], labels[keep], reduction="sum"
                ).item()
                count += int(keep.sum())
            for ids in prompts:
                room = min(spec["max_new_tokens"], POSITIONS - len(ids))
                output = model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                    max_new_tokens=room,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos,
                )
                new = output[0, len(ids) :].tolist()
                texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        generations[name] = texts
        losses[name] = total / max(count, 1.0)
    return {"generations": generations, "eval_loss": losses}


WORKERS = {"lora": run_lora, "full": run_full, "trl": run_trl, "decode": run_decode}


def worker(kind: str, spec_path: str) -> int:
    """Run `kind` from its spec file; write `KIND_result.json` beside it."""
    result = WORKERS[kind](_load(spec_path))
    _dump(spec_path.replace("_spec.json", "_result.json"), result)
    return 0


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: dict, examples: int) -> str:
    """The table, the settings and `examples` generations side by side."""
    runs = report["runs"]
    lines = [
        "| run | BLEU | ROUGE-L | eval loss | trainable params | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in runs.items():
        lines.append(
            f"| {name} | {row['bleu']:.2f} | {row['rouge_l']:.2f} | "
            f"{row['eval_loss']:.3f} | {row.get('trainable_params', 0):,} | "
            f"{row.get('train_seconds', 0)} |"
        )
    lines += ["", f"Data: {report['data']}; seconds: {report['seconds']}", ""]
    names = list(runs)
    lines += [
        "| MR | a reference | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for row in report["generations"][:examples]:
        cells = [row["mr"], row["references"][0], *(row[n] for n in names)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
