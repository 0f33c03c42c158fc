"""`keras-lora sft`: flags -> `SftConfig` -> the sft recipe."""

from __future__ import annotations

import argparse
import json

from keras_lora.cli.arguments import (
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
)
from keras_lora.families import FAMILIES
from keras_lora.initialization import check_init

FMT = argparse.ArgumentDefaultsHelpFormatter
# Flags whose defaults are SftConfig's: passed on only when given.
CONFIG_DEFAULTS = (
    "init",
    "use_dora",
    "steps",
    "epochs",
    "optimizer",
    "eval_every",
    "quantize",
    "remat",
    "chunked_loss",
    "distribution",
    "checkpoint_every",
    "packing",
    "buckets",
)
# `--chunked-loss` without a count: pieces of the sequence axis.
CHUNKS = 8


def add_sft(sub) -> None:
    """Register `keras-lora sft`."""
    sft = sub.add_parser(
        "sft",
        help="instruction fine-tuning of a Hugging Face model directory with "
        "LoRA (--inspect: the encoded data only).",
        description="Encode instruction data as TRL's SFTTrainer does: the "
        "model's tokenizer and chat template, loss on the answers.",
        formatter_class=FMT,
    )
    sft.add_argument(
        "--model",
        required=True,
        help="local Hugging Face model directory (tokenizer.json, "
        "tokenizer_config.json, chat_template.jinja), or a keras-hub preset: a "
        "name such as llama3_8b_en (downloaded by keras-hub) or a directory "
        "saved with save_to_preset (the family's built-in chat template).",
    )
    sft.add_argument(
        "--data",
        required=True,
        help="JSONL, JSON list, CSV or TSV: {'text'}, {'prompt', 'completion'} "
        "(strings or chat messages) or {'messages'}.",
    )
    sft.add_argument("--out", required=True, help="output directory.")
    sft.add_argument(
        "--inspect",
        action="store_true",
        help="tokenize only: write OUT/encoded.jsonl and OUT/data_report.json.",
    )
    sft.add_argument(
        "--chat-template",
        help="Jinja chat template file (overrides the model's, or a preset's "
        "built-in one).",
    )
    sft.add_argument("--text-column", help="CSV/TSV column of the texts.")
    sft.add_argument("--prompt-column", help="CSV/TSV column of the prompts.")
    sft.add_argument("--completion-column", help="CSV/TSV column of the completions.")
    sft.add_argument(
        "--max-length",
        type=positive_int,
        default=1024,
        help="longest sequence in tokens; longer ones keep their start.",
    )
    sft.add_argument(
        "--loss-on",
        choices=("answers", "all"),
        default="answers",
        help="answers: completions and assistant turns (all of a text); "
        "all: every token.",
    )
    sft.add_argument("--eval-data", help="data file to evaluate on.")
    sft.add_argument(
        "--eval-split",
        type=fraction,
        default=0.0,
        help="without --eval-data: hold out this fraction of the examples; "
        "0 evaluates on the training data.",
    )
    sft.add_argument("--rank", type=positive_int, default=8)
    sft.add_argument("--alpha", type=positive_float, default=16.0)
    sft.add_argument("--dropout", type=fraction, default=0.0)
    sft.add_argument(
        "--init",
        type=_init,
        default=argparse.SUPPRESS,
        metavar="{kaiming,gaussian,pissa,pissa_niter_K,olora}",
        help="how the LoRA factors start (PEFT's init_lora_weights; kaiming: B = 0).",
    )
    sft.add_argument(
        "--use-dora",
        action="store_true",
        default=argparse.SUPPRESS,
        help="DoRA: also train a magnitude per output feature.",
    )
    sft.add_argument(
        "--targets",
        nargs="+",
        help="roles or layer names to adapt; all-linear adds every linear "
        "layer but the output head, token_embedding the token embedding "
        "and a tied output head (families whose PEFT export holds it: "
        f"{', '.join(f.label for f in FAMILIES if f.hf_embedding)}); e.g. "
        "all-linear token_embedding. Default: the family's.",
    )
    length = sft.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=positive_int,
        default=argparse.SUPPRESS,
        help="optimizer steps (20 when neither --steps nor --epochs is given).",
    )
    length.add_argument(
        "--epochs",
        type=positive_int,
        default=argparse.SUPPRESS,
        help="passes over the training examples: ceil(examples / batch) steps each.",
    )
    sft.add_argument("--batch", type=positive_int, default=4)
    sft.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default=argparse.SUPPRESS,
        help="adamw (Keras's AdamW, the default) or sgd.",
    )
    sft.add_argument("--learning-rate", type=positive_float, default=2e-4)
    sft.add_argument(
        "--eval-every",
        type=positive_int,
        default=argparse.SUPPRESS,
        help="also evaluate every N steps (report.json's eval_loss_every).",
    )
    sft.add_argument(
        "--packing",
        action="store_true",
        default=argparse.SUPPRESS,
        help="several examples share each row of --max-length tokens, each "
        "attending only to itself; --batch counts rows (not for GPT-2).",
    )
    sft.add_argument(
        "--buckets",
        choices=("on", "off"),
        default=argparse.SUPPRESS,
        type=str,
        help="on (the default): batches of a few padded lengths (8, 16, 32, "
        "... tokens); off: every batch padded to the longest example.",
    )
    sft.add_argument("--seed", type=int, default=0)
    _add_memory(sft)
    sft.add_argument(
        "--init-adapter",
        help="start from this keras-lora adapter's factors (e.g. an earlier "
        "run's OUT/adapter; the same rank, targets and DoRA setting).",
    )
    sft.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=argparse.SUPPRESS,
        help="save a checkpoint in OUT/checkpoints every N steps (default "
        "100) and at the end.",
    )
    sft.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in OUT, exactly (the same "
        "settings; --steps/--epochs may grow).",
    )
    sft.add_argument(
        "--quiet", action="store_true", help="no progress output while training."
    )
    sft.add_argument(
        "--generate-prompts",
        type=non_negative_int,
        default=3,
        metavar="K",
        help="greedy generations for the first K eval prompts, before and "
        "after training (report.json's generations); 0: none.",
    )
    sft.add_argument(
        "--generate-tokens",
        type=positive_int,
        default=32,
        metavar="N",
        help="the most new tokens of a generation (it stops at the "
        "end-of-turn token or EOS).",
    )
    sft.add_argument(
        "--merged-hf",
        metavar="DIR",
        help="also write the merged model here: a Hugging Face directory "
        "with the tokenizer and chat template (transformers loads it).",
    )
    sft.set_defaults(run=sft_command)


def _add_memory(sft) -> None:
    """The memory-budget and scale-out flags (`recipes.sft.memory`)."""
    sft.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=argparse.SUPPRESS,
        help="quantize the base's projections and token embedding (LoRA stays "
        "float; not with --use-dora, pissa or olora).",
    )
    sft.add_argument(
        "--remat",
        action="store_true",
        default=argparse.SUPPRESS,
        help="recompute each decoder block in the backward pass.",
    )
    sft.add_argument(
        "--chunked-loss",
        type=positive_int,
        nargs="?",
        const=CHUNKS,
        default=argparse.SUPPRESS,
        metavar="N",
        help=f"compute the loss N pieces of the sequence at a time (N={CHUNKS} "
        "when not given): the full logits never exist.",
    )
    sft.add_argument(
        "--distribution",
        choices=("data", "model"),
        default=argparse.SUPPRESS,
        help="JAX only: keras.distribution over every device JAX sees; data: "
        "DataParallel; model: ModelParallel with the family's layout map. "
        "--batch must divide over the data-parallel replicas.",
    )


def _init(text: str) -> str:
    """argparse type: a LoRA initialisation name (`check_init`)."""
    try:
        return check_init(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def sft_command(args: argparse.Namespace) -> int:
    """Run `keras-lora sft` from parsed flags; returns the exit status."""
    from keras_lora.recipes.sft.config import SftConfig
    from keras_lora.recipes.sft.inspection import inspect_data, summary

    config = SftConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        chat_template=args.chat_template,
        text_column=args.text_column,
        prompt_column=args.prompt_column,
        completion_column=args.completion_column,
        max_length=args.max_length,
        loss_on=args.loss_on,
        inspect=args.inspect,
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=tuple(args.targets) if args.targets else None,
        batch=args.batch,
        learning_rate=args.learning_rate,
        seed=args.seed,
        init_adapter=args.init_adapter,
        resume=args.resume,
        quiet=args.quiet,
        generate_prompts=args.generate_prompts,
        generate_tokens=args.generate_tokens,
        merged_hf=args.merged_hf,
        **{name: getattr(args, name) for name in CONFIG_DEFAULTS if name in args},
    )
    if not config.inspect:
        from keras_lora.recipes.sft.run import train

        report = train(config)
        print(
            f"{report['family']}: eval loss {report['eval_loss_before']:.4f} -> "
            f"{report['eval_loss_after']:.4f} after {report['steps']} steps "
            f"({report['eval_data']})"
        )
        for number, generation in enumerate(report["generations"], 1):
            prompt = json.dumps(generation["prompt"], ensure_ascii=False)
            print(f"generation {number}: {prompt}")
            for when in ("before", "after"):
                answer = json.dumps(generation[when], ensure_ascii=False)
                print(f"  {when}: {answer}")
        names = ["adapter", "peft", report["loss_plot"], "report.json", "checkpoints"]
        written = [f"{config.out}/{n}" for n in names if n]
        if config.merged_hf is not None:
            written.append(f"{config.merged_hf} (merged)")
        print("wrote " + ", ".join(written))
        for note in report["notes"]:
            print(note)
        return 0
    report = inspect_data(config)
    print(summary(report))
    print(f"wrote {config.out}/encoded.jsonl and {config.out}/data_report.json")
    return 0
