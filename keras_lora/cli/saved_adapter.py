"""`keras-lora generate|merge|export-peft|import-peft`: flags -> recipes."""

from __future__ import annotations

import argparse

from keras_lora.cli.arguments import add_base, positive_int
from keras_lora.recipes import saved_adapter

FMT = argparse.ArgumentDefaultsHelpFormatter
# `generate` defaults, applied after the flags are checked (None: not given).
PRESET_MAX_LENGTH = 40
MAX_NEW_TOKENS = 32


def add_commands(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="Generate text greedily (--chat: an answer with the chat template).",
        description="Greedy generation of a keras-hub preset (--preset, "
        "--prompt) or of a Hugging Face model directory (--model) of any "
        "family: --chat renders each prompt as a user message with the "
        "model's chat template and prints the answer, stopped at the "
        "end-of-turn token or EOS.",
        formatter_class=FMT,
    )
    base = gen.add_mutually_exclusive_group(required=True)
    base.add_argument(
        "--preset",
        help="base model: keras-hub preset name, local Keras preset dir or "
        "local Hugging Face GPT-2 dir.",
    )
    base.add_argument(
        "--model",
        help="local Hugging Face model directory (weights, tokenizer.json, "
        "chat template) of any family keras-lora knows, or a keras-hub "
        "preset (its family's built-in chat template, as sft uses).",
    )
    gen.add_argument(
        "--tokenizer", help="(--preset) directory with vocab.json and merges.txt."
    )
    gen.add_argument(
        "--seq", type=positive_int, default=128, help="(--preset) preprocessor length."
    )
    gen.add_argument("--adapter", help="adapter directory (save_adapter format).")
    asked = gen.add_mutually_exclusive_group(required=True)
    asked.add_argument(
        "--prompt", action="append", help="text to continue; repeatable."
    )
    asked.add_argument(
        "--chat",
        action="append",
        metavar="MESSAGE",
        help="(--model) a user message, rendered with the chat template; "
        "prints the answer; repeatable.",
    )
    gen.add_argument(
        "--chat-template",
        help="(--model) Jinja chat template file (overrides the model's).",
    )
    gen.add_argument(
        "--max-length",
        type=positive_int,
        help="(--preset) generation length in tokens, prompt included "
        f"(default {PRESET_MAX_LENGTH}).",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help=f"(--model) the most new tokens of an answer (default {MAX_NEW_TOKENS}).",
    )
    gen.add_argument("--merge", action="store_true", help="merge before generating.")
    gen.set_defaults(run=generate, usage_error=gen.error)

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
    _check_generate_flags(args)
    if args.model is not None:
        answers, labels = saved_adapter.generate_hf(
            args.model,
            args.chat or args.prompt,
            chat=args.chat is not None,
            adapter=args.adapter,
            merge=args.merge,
            max_new_tokens=args.max_new_tokens or MAX_NEW_TOKENS,
            chat_template=args.chat_template,
        )
        template = labels["chat_template"] if args.chat else None
        print(f"model: {args.model}; chat template: {template or 'none'}")
        print(f"adapter: {args.adapter or 'none'}")
        for answer in answers:
            print(answer)
        return 0
    outputs, labels = saved_adapter.generate(
        args.preset,
        args.prompt,
        adapter=args.adapter,
        merge=args.merge,
        max_length=args.max_length or PRESET_MAX_LENGTH,
        sequence_length=args.seq,
        tokenizer=args.tokenizer,
    )
    print(f"weights: {labels['weights']}; tokenizer: {labels['tokenizer']}")
    print(f"adapter: {args.adapter or 'none'}")
    for output in outputs:
        print(output)
    return 0


def _check_generate_flags(args: argparse.Namespace) -> None:
    """Flags of one base model kind given with the other: a usage error."""
    if args.model is not None:
        wrong = {"--tokenizer": args.tokenizer, "--max-length": args.max_length}
        kind = "--preset"
    else:
        wrong = {
            "--chat": args.chat,
            "--chat-template": args.chat_template,
            "--max-new-tokens": args.max_new_tokens,
        }
        kind = "--model HF_DIR (a keras-hub preset carries no chat template)"
    given = [flag for flag, value in wrong.items() if value is not None]
    if given:
        args.usage_error(f"{', '.join(given)} needs {kind}")


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
