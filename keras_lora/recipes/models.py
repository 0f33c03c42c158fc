"""GPT-2 task models for the recipes: presets, random architectures, labels.

One table, `ARCHITECTURES`, serves `finetune`, `demo` and the benchmark:
a random-weight GPT-2 of a known size, so everything runs offline. Every
loader returns a label saying which weights it used, because outputs must
say whether their numbers come from real or random weights.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A GPT-2 shape, built with random weights.

    Args:
        name: the table key ("tiny", "base", ...).
        label: what the outputs call it.
        vocabulary_size: embedding rows; a tokenizer may use fewer.
        num_layers, num_heads, hidden_dim, intermediate_dim,
        max_sequence_length: `keras_hub.models.GPT2Backbone` arguments.
    """

    name: str
    label: str
    vocabulary_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    intermediate_dim: int
    max_sequence_length: int

    def backbone_config(self) -> dict:
        """The `GPT2Backbone` keyword arguments."""
        config = dataclasses.asdict(self)
        del config["name"], config["label"]
        return config


def _gpt2(name: str, layers: int, heads: int, hidden: int) -> Architecture:
    # The published GPT-2 shapes, so parameter counts match GPT-2's (base:
    # 147,456 LoRA parameters at rank 4 on query/value).
    return Architecture(
        name,
        f"GPT-2 {name} architecture",
        50257,
        layers,
        heads,
        hidden,
        4 * hidden,
        1024,
    )


ARCHITECTURES: dict[str, Architecture] = {
    "tiny": Architecture(
        name="tiny",
        label="GPT-2 tiny architecture (2 layers, hidden 64, vocabulary 1024)",
        vocabulary_size=1024,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=256,
    ),
    "base": _gpt2("base", 12, 12, 768),
    "medium": _gpt2("medium", 24, 16, 1024),
    "large": _gpt2("large", 36, 20, 1280),
}
# Older spelling of "base" on the command line (`--arch gpt2-base-random`).
ALIASES = {"gpt2-base-random": "base"}


def architecture(name: str) -> Architecture:
    """The architecture called `name` (a key of `ARCHITECTURES` or an alias).

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:

    >>> architecture("gpt2-base-random").hidden_dim
    768
    """
    key = ALIASES.get(name, name)
    if key not in ARCHITECTURES:
        known = ", ".join([*ARCHITECTURES, *ALIASES])
        raise ValueError(f"unknown architecture {name!r}: choose from {known}")
    return ARCHITECTURES[key]


def check_path(path: str | None, what: str, is_dir: bool = True) -> None:
    """Raise FileNotFoundError naming `what` if `path` is given but missing."""
    if path is None:
        return
    ok = os.path.isdir(path) if is_dir else os.path.exists(path)
    if not ok:
        kind = "directory" if is_dir else "file"
        raise FileNotFoundError(f"{what} {kind} {path!r} does not exist")


def _looks_like_path(preset: str) -> bool:
    return os.sep in preset or preset.startswith(".") or os.path.exists(preset)


def describe_preset(preset: str) -> str:
    """Which weights `preset` means, for the outputs.

    Args:
        preset: a keras-hub preset name, a local Keras preset directory or a
            local Hugging Face GPT-2 directory.

    Returns:
        A one-line description.

    Raises:
        FileNotFoundError: for a path that is missing or has no config.json.

    Example:

    >>> describe_preset("gpt2_base_en")
    "keras-hub preset 'gpt2_base_en' (pretrained weights)"
    """
    if not _looks_like_path(preset):
        return f"keras-hub preset {preset!r} (pretrained weights)"
    if not os.path.isdir(preset):
        raise FileNotFoundError(f"model directory {preset!r} does not exist")
    config_path = os.path.join(preset, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{preset!r} is not a model directory: no config.json (pass a "
            "keras-hub preset name, a Keras preset dir or a Hugging Face GPT-2 dir)"
        )
    with open(config_path) as f:
        config = json.load(f)
    if "class_name" in config:
        return f"local Keras preset {os.path.abspath(preset)}"
    return f"local Hugging Face GPT-2 {os.path.abspath(preset)}"


def tokenizer_from_dir(path: str):
    """A `GPT2Tokenizer` from a directory with vocab.json and merges.txt.

    Raises:
        FileNotFoundError: when the directory or one of the files is missing.
    """
    import keras_hub

    check_path(path, "tokenizer")
    files = [os.path.join(path, name) for name in ("vocab.json", "merges.txt")]
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"tokenizer directory {path!r} lacks {os.path.basename(file)} "
                "(a GPT-2 tokenizer needs vocab.json and merges.txt)"
            )
    return keras_hub.models.GPT2Tokenizer(vocabulary=files[0], merges=files[1])


def load_task(preset: str, sequence_length: int = 128, tokenizer: str | None = None):
    """A `GPT2CausalLM` and a description of its weights and tokenizer.

    Args:
        preset: keras-hub preset name, local Keras preset or Hugging Face dir.
        sequence_length: the preprocessor's sequence length.
        tokenizer: a directory with vocab.json and merges.txt, overriding the
            preset's tokenizer.

    Returns:
        `(lm, {"weights": ..., "tokenizer": ...})`.

    Raises:
        FileNotFoundError: for a missing directory.
        ValueError: when keras-hub cannot load the model or its tokenizer.
    """
    import keras_hub

    weights = describe_preset(preset)
    if tokenizer is not None:
        tok = tokenizer_from_dir(tokenizer)
        tokenizer_label = f"GPT-2 BPE from {os.path.abspath(tokenizer)}"
    else:
        try:
            tok = keras_hub.models.GPT2Tokenizer.from_preset(preset)
        except Exception as error:
            raise ValueError(
                f"cannot load a tokenizer from {preset!r} "
                f"({type(error).__name__}: {error}); for a Hugging Face dir "
                "add vocab.json and merges.txt, or pass --tokenizer DIR"
            ) from error
        tokenizer_label = f"the preset's tokenizer ({preset})"
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tok, sequence_length=sequence_length
    )
    try:
        lm = keras_hub.models.GPT2CausalLM.from_preset(
            preset, preprocessor=preprocessor
        )
    except (ValueError, OSError):
        raise
    except Exception as error:  # Network and format errors of keras-hub.
        raise ValueError(
            f"cannot load model {preset!r}: {type(error).__name__}: {error}"
        ) from error
    return lm, {"weights": weights, "tokenizer": tokenizer_label}


def random_task(arch: str, tokenizer, sequence_length: int, seed: int):
    """A `GPT2CausalLM` with random weights of architecture `arch`.

    Args:
        arch: a name `architecture` knows.
        tokenizer: a `GPT2Tokenizer` no larger than the architecture's
            vocabulary.
        sequence_length: the preprocessor's sequence length.
        seed: seeds the weights.

    Returns:
        `(lm, backbone config dict)`.

    Raises:
        ValueError: for an unknown architecture, a tokenizer larger than its
            vocabulary or a sequence longer than it allows.
    """
    import keras_hub

    shape = architecture(arch)
    if tokenizer.vocabulary_size() > shape.vocabulary_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocabulary_size()} tokens, more "
            f"than architecture {arch!r} embeds ({shape.vocabulary_size})"
        )
    if sequence_length > shape.max_sequence_length:
        raise ValueError(
            f"--seq {sequence_length} exceeds the {arch} architecture's "
            f"max_sequence_length {shape.max_sequence_length}"
        )
    keras.utils.set_random_seed(seed)
    config = shape.backbone_config()
    backbone = keras_hub.models.GPT2Backbone(**config)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    return lm, config


def generate(lm, prompts, max_length: int) -> list[str]:
    """Generations of `lm` (with the sampler it was compiled with), one per prompt."""
    # No stop token: a random or briefly trained model may emit
    # <|endoftext|> first, and a fixed length shows more of what it learned.
    outputs = lm.generate(list(prompts), max_length=max_length, stop_token_ids=None)
    return [str(o) for o in outputs]
