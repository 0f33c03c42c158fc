"""`keras-lora compare`: flags -> `bench.engine.compare` (or `render`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex

from keras_lora.bench import compare_config, engine, mixed
from keras_lora.bench.compare_config import CompareConfig, ConfigError
from keras_lora.cli.arguments import (
    non_negative_int,
    positive_float,
    positive_int,
    split_list,
)
from keras_lora.families import GPT2
from keras_lora.recipes.models import ALIASES, ARCHITECTURES

# --backend when not given (--mode speed: every installed backend).
TRAIN_BACKENDS = ("jax", "tensorflow")
# The `CompareConfig` fields whose flag has another name (a field's flag is
# otherwise --field-name).
FIELD_ARGUMENTS = {"backends": "backend", "base_dtypes": "base_dtype", "losses": "loss"}


def add_compare(sub) -> None:
    parser = sub.add_parser(
        "compare",
        help="Full fine-tuning vs keras-lora vs built-in LoRA (vs PEFT), "
        "each run in its own process.",
        description="Compare keras-lora with full fine-tuning, keras-hub's "
        "enable_lora, a one-bias floor and Hugging Face PEFT: same model, "
        "data, batch and steps; table, ratios and charts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        nargs="+",
        help="Keras backends for the Keras runs "
        f"({', '.join(compare_config.BACKENDS)}; default jax tensorflow, "
        "--mode speed: every installed one).",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--arch",
        choices=sorted([*ARCHITECTURES, *ALIASES]),
        default="base",
        help="GPT-2 architecture size, with random weights.",
    )
    model.add_argument(
        "--tiny", action="store_true", help="the tiny GPT-2 (same as --arch tiny)."
    )
    model.add_argument(
        "--preset",
        help="keras-hub GPT-2 preset (name or local directory) for the Keras "
        "runs; the PEFT run uses the same architecture with random weights.",
    )
    parser.add_argument("--batch", type=positive_int, default=8, help="sequences/step.")
    parser.add_argument(
        "--seq", type=positive_int, default=128, help="tokens/sequence."
    )
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps.")
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=3,
        help="untimed steps first (compilation).",
    )
    parser.add_argument(
        "--rank", type=positive_int, help="LoRA rank (4; --mode mixed: 8)."
    )
    parser.add_argument(
        "--alpha", type=positive_float, default=32.0, help="LoRA alpha (alpha / rank)."
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(GPT2.default_targets),
        help=f"layers to adapt, among: {', '.join(GPT2.roles)}; 'all' means all.",
    )
    parser.add_argument(
        "--dtype-policy",
        choices=compare_config.DTYPE_POLICIES,
        default="float32",
        help="Keras dtype policy (the PEFT run uses torch autocast to match).",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        help=f"which runs ({', '.join(compare_config.RUNS)}; default all, --mode "
        "speed: lora floor peft).",
    )
    parser.add_argument(
        "--learning-rate", type=positive_float, default=5e-5, help="AdamW rate."
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data.")
    parser.add_argument(
        "--tokens",
        metavar="NPY",
        help="train (and evaluate) on these token ids instead of random ones: "
        "a .npy int array of shape (rows, seq + 1), e.g. tokenized text "
        "(keras_lora.recipes.tokenization.token_windows). Every run reads the "
        "same rows.",
    )
    parser.add_argument(
        "--eval-batches",
        type=non_negative_int,
        default=0,
        help="hold out this many batches (the last rows of the data) and "
        "report each run's loss on them after training.",
    )
    parser.add_argument(
        "--inference-runs",
        type=positive_int,
        default=8,
        help="timed forward passes (each).",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="repeat every run this many times, round-robin; each run reports "
        "its round with the lowest median step time. results.json keeps all.",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=3600, help="seconds per run."
    )
    parser.add_argument(
        "--base-dtype",
        nargs="+",
        help="the LoRA run's whole-model dtype, one row each "
        f"({', '.join(compare_config.BASE_DTYPES)}; default float32, --mode speed: "
        "both). A bfloat16 base keeps the LoRA factors float32.",
    )
    parser.add_argument(
        "--peft-autocast",
        nargs="+",
        help="the PEFT run's precision, one row each: 'none' (as "
        "--dtype-policy) or 'bfloat16' (torch.autocast); default none, "
        "--mode speed: both.",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        help="the model's dropout in every run, Keras and PEFT (GPT-2's own "
        "is 0.1); 0 lets Keras attention use ops.dot_product_attention. "
        "Random-weight architectures only.",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        default=["none"],
        help="quantize the LoRA run's frozen base before injecting, one row "
        f"each ({', '.join(compare_config.QUANTIZE_MODES)}).",
    )
    parser.add_argument(
        "--remat",
        nargs="+",
        default=["none"],
        help="build and inject the LoRA run inside keras.RematScope, one row "
        f"each ({', '.join(compare_config.REMAT_MODES)}; Keras's 'full' and "
        "'larger_than' fail on keras-hub GPT-2). The LoRA run is repeated "
        "for every combination of --base-dtype, --quantize and --remat.",
    )
    parser.add_argument(
        "--quantize-build",
        nargs="+",
        default=["after"],
        help="how a --quantize base is built, one row each: 'after' "
        "quantizes a float model, 'during' builds each layer quantized so "
        "no float copy exists (keras_lora.families.quantized_dtype).",
    )
    parser.add_argument(
        "--loss",
        nargs="+",
        default=["dense"],
        help="training loss of every run, one row each: 'dense' (full "
        "logits) or 'chunked' (cross-entropy over --loss-chunks pieces of "
        "the sequence, keras_lora.chunked_causal_lm).",
    )
    parser.add_argument(
        "--loss-chunks",
        type=int,
        default=8,
        help="pieces of the sequence for --loss chunked.",
    )
    parser.add_argument(
        "--mode",
        choices=("train", "speed", "mixed"),
        default="train",
        help="train: the fine-tuning comparison; speed: keras-lora against "
        "PEFT on every installed backend, same precision against same "
        "precision (float32 and a bfloat16 base vs PEFT under bfloat16 "
        "autocast), with the one-bias floor; mixed: serve a batch whose "
        "rows use different adapters (adapter_batch vs one adapter vs PEFT "
        "adapter_names=), forward and generate (uses --backend, --arch/"
        "--tiny, --batch, --seq, --rank, --alpha, --targets, --seed, "
        "--timeout, --out and the flags below; --runs peft adds PEFT, the "
        "default).",
    )
    mixed = parser.add_argument_group("--mode mixed")
    mixed.add_argument(
        "--adapters", type=positive_int, default=8, help="adapters in the model."
    )
    mixed.add_argument(
        "--new-tokens", type=positive_int, default=32, help="tokens generated."
    )
    mixed.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="timed forward passes per variant (generate: --generate-repeats).",
    )
    mixed.add_argument(
        "--generate-repeats",
        type=positive_int,
        default=3,
        help="timed generate calls per variant.",
    )
    mixed.add_argument(
        "--switches", type=positive_int, default=3, help="set_adapter switches timed."
    )
    parser.add_argument("--out", default=os.path.join("runs", "compare"))
    parser.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="run nothing: rewrite the table, ratios and charts of an earlier "
        "results.json (in its own directory).",
    )
    parser.set_defaults(run=compare)


def compare(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """`keras-lora compare`: exit 1 when a run failed."""
    if args.render:
        data, out = engine.read_results(args.render)
        if data["config"].get("mode") == "mixed":
            return 0 if engine.succeeded(mixed.render(data, out)) else 1
        return 0 if engine.succeeded(engine.render(data, out)) else 1
    if args.mode == "mixed":
        return compare_mixed(args, argv)
    args.rank = args.rank or 4
    speed = args.mode == "speed"
    if args.backend is None:
        args.backend = (
            compare_config.installed_backends() if speed else list(TRAIN_BACKENDS)
        )
    if args.runs is None:
        args.runs = ["lora", "floor", "peft"] if speed else list(compare_config.RUNS)
    if args.base_dtype is None:
        args.base_dtype = list(compare_config.BASE_DTYPES) if speed else ["float32"]
    if args.peft_autocast is None:
        args.peft_autocast = list(compare_config.PEFT_AUTOCAST) if speed else ["none"]
    values = {}
    for field in dataclasses.fields(CompareConfig):
        name = FIELD_ARGUMENTS.get(field.name, field.name)
        if not hasattr(args, name):
            continue  # No flag: the field's default, or set below.
        value = getattr(args, name)
        # A field holding several values takes a list flag.
        values[field.name] = (
            tuple(split_list(value)) if isinstance(field.default, tuple) else value
        )
    values["arch"] = "tiny" if args.tiny else args.arch
    values["command"] = shlex.join(["keras-lora", *(argv or ["compare"])])
    try:
        config = CompareConfig(**values)
    except ConfigError as error:
        flag = "--" + FIELD_ARGUMENTS.get(error.field, error.field).replace("_", "-")
        raise ValueError(f"{flag} {error.detail}") from None
    return 0 if engine.succeeded(engine.compare(config)) else 1


def compare_mixed(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """`keras-lora compare --mode mixed`: exit 1 when a run failed."""
    runs = split_list(args.runs or list(compare_config.RUNS))
    config = mixed.MixedConfig(
        out=args.out,
        backends=tuple(dict.fromkeys(split_list(args.backend or list(TRAIN_BACKENDS)))),
        peft="peft" in runs,
        arch="tiny" if args.tiny else args.arch,
        adapters=args.adapters,
        rank=args.rank or 8,
        alpha=args.alpha,
        targets=tuple(split_list(args.targets)),
        batch=args.batch,
        seq=args.seq,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        generate_repeats=args.generate_repeats,
        switches=args.switches,
        seed=args.seed,
        timeout=args.timeout,
        command=shlex.join(["keras-lora", *(argv or ["compare"])]),
    )
    return 0 if engine.succeeded(mixed.compare_mixed(config)) else 1
