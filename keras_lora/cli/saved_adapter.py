"""`keras-lora generate|merge|export-peft|import-peft`: flags -> recipes."""

from __future__ import annotations

import argparse

from keras_lora.cli.arguments import add_base, positive_int
from keras_lora.recipes import saved_adapter

FMT = argparse.ArgumentDefaultsHelpFormatter


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="Generate text.", formatter_class=FMT)
    add_base(gen)
    gen.add_argument("--adapter", help="adapter directory (save_adapter format).")
    gen.add_argument("--prompt", action="append", required=True, help="repeatable.")
    gen.add_argument("--max-length", type=positive_int, default=40)
    gen.add_argument("--merge", action="store_true", help="merge before generating.")
    gen.set_defaults(run=generate)

    mg = sub.add_parser(
        "merge", help="Merge an adapter into a new local preset.", formatter_class=FMT
    )
    add_base(mg)
    mg.add_argument("--adapter", required=True, help="adapter directory.")
    mg.add_argument("--out", required=True, help="new preset directory.")
    mg.add_argument(
        "--format",
        choices=saved_adapter.MERGE_FORMATS,
        default="keras",
        help="keras: a keras-hub preset; hf: a Hugging Face model directory "
        "(transformers.AutoModelForCausalLM.from_pretrained loads it).",
    )
    mg.set_defaults(run=merge)

    ex = sub.add_parser(
        "export-peft", help="Write an adapter as a Hugging Face PEFT adapter."
    )
    add_base(ex)
    ex.add_argument("--adapter", required=True, help="adapter directory.")
    ex.add_argument("--out", required=True, help="PEFT adapter directory.")
    ex.add_argument(
        "--base-model-name", help="base_model_name_or_path for adapter_config.json."
    )
    ex.set_defaults(run=export_peft)

    im = sub.add_parser("import-peft", help="Read a Hugging Face PEFT GPT-2 adapter.")
    add_base(im)
    im.add_argument("--peft", required=True, help="PEFT adapter directory.")
    im.add_argument("--out", required=True, help="adapter directory to write.")
    im.set_defaults(run=import_peft)


def generate(args: argparse.Namespace) -> int:
    """`keras-lora generate`: base model (+ adapter) text generation."""
    outputs, labels = saved_adapter.generate(
        args.preset,
        args.prompt,
        adapter=args.adapter,
        merge=args.merge,
        max_length=args.max_length,
        sequence_length=args.seq,
        tokenizer=args.tokenizer,
    )
    print(f"weights: {labels['weights']}; tokenizer: {labels['tokenizer']}")
    print(f"adapter: {args.adapter or 'none'}")
    for output in outputs:
        print(output)
    return 0


def merge(args: argparse.Namespace) -> int:
    """`keras-lora merge`: base + adapter -> a merged local preset."""
    done = saved_adapter.merge_to_preset(
        args.preset, args.adapter, args.out, args.seq, args.tokenizer, args.format
    )
    loader = (
        "transformers.AutoModelForCausalLM.from_pretrained"
        if args.format == "hf"
        else "keras_hub.models.CausalLM.from_preset"
    )
    print(
        f"merged {done['layers']} LoRA layers of {args.adapter} into "
        f"{done['weights']}; wrote {done['preset']} (load with {loader})"
    )
    return 0


def export_peft(args: argparse.Namespace) -> int:
    """`keras-lora export-peft`: adapter -> Hugging Face PEFT directory."""
    path = saved_adapter.export_peft_dir(
        args.preset,
        args.adapter,
        args.out,
        base_model_name=args.base_model_name,
        sequence_length=args.seq,
        tokenizer=args.tokenizer,
    )
    print(f"wrote PEFT adapter {path}")
    return 0


def import_peft(args: argparse.Namespace) -> int:
    """`keras-lora import-peft`: Hugging Face PEFT directory -> adapter."""
    done = saved_adapter.import_peft_dir(
        args.preset, args.peft, args.out, args.seq, args.tokenizer
    )
    print(
        f"imported {done['layers']} LoRA layers from {args.peft}; "
        f"wrote adapter {done['adapter']}"
    )
    return 0
