"""keras-lora's own small pretrained GPT-2: how it is made and how it loads.

No pretrained weights can be downloaded offline, so keras-lora ships its own
base model: a keras-hub GPT-2 (`PRETRAIN.layers` layers, hidden
`PRETRAIN.hidden`) pretrained from random weights on the train side of the
standard-library docstrings corpus (`data.docstring_split`), with a
byte-level BPE tokenizer trained on the same text. The files live in
`keras_lora/recipes/assets/` (float16 safetensors weights, vocab.json,
merges.txt, card.json); their SHA-256 digests are recorded here in `DIGESTS`
and checked on every load.

Reproduce the shipped files (about 8 minutes on 2 CPU cores, JAX backend):

    KERAS_BACKEND=jax python -m keras_lora.recipes.pretrain --out DIR

and copy DIR's files into `keras_lora/recipes/assets/` (then update
`DIGESTS`, which the command prints).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time

import keras

from keras_lora.files import atomic_write
from keras_lora.recipes import data, tokenization

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
FILES = ("model.safetensors", "vocab.json", "merges.txt", "card.json")
# SHA-256 of each shipped file; `load_pretrained` refuses files that differ.
DIGESTS = {  # noqa: E501 (one digest a line)
    "model.safetensors": "8079991326103df2e371902726b8d84f2837a116735c15293fc6e982597edad9",  # noqa: E501
    "vocab.json": "6c7138506fb4fd05b75e0bd93c8db4469b0653f31b5536815f49e0db95ca0c9e",
    "merges.txt": "0ff032118dacb89f2859e85d9d569486868e556cdd5351ebcd407cab361528e3",
    "card.json": "7d0518e4a837d9a4251f27672338103e6351de3b77d1bba9a3bcde651b8fd463",
}
COMMAND = "KERAS_BACKEND=jax python -m keras_lora.recipes.pretrain"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """How the base model is pretrained (the defaults made the shipped one).

    Args:
        out: where to write the files.
        layers, heads, hidden, intermediate: the GPT-2 shape.
        seq: tokens per training row (and the model's maximum length).
        vocab_size: the BPE vocabulary to learn.
        steps, batch: training steps and rows per step.
        learning_rate: AdamW's peak learning rate (warm-up, cosine decay).
        seed: seeds weights and row order.
    """

    out: str
    layers: int = 4
    heads: int = 4
    hidden: int = 128
    intermediate: int = 512
    seq: int = 128
    vocab_size: int = 4096
    steps: int = 500
    batch: int = 16
    learning_rate: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name not in ("out", "seed") and not value > 0:
                raise ValueError(f"{field.name} must be positive, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(
                f"hidden {self.hidden} must be a multiple of heads {self.heads}"
            )


def description(card: dict | None = None) -> str:
    """The one line every output uses to name the shipped base model."""
    card = card or read_card(ASSETS)
    shape = card["architecture"]
    return (
        f"keras-lora's own small GPT-2 ({card['parameters']:,} parameters: "
        f"{shape['num_layers']} layers, hidden {shape['hidden_dim']}, "
        f"{shape['num_heads']} heads), pretrained by `{card['command']}` for "
        f"{card['steps']} steps on {card['corpus']}"
    )


def tokenizer_description(card: dict | None = None) -> str:
    """Names the shipped tokenizer."""
    card = card or read_card(ASSETS)
    return (
        f"keras-lora's byte-level BPE ({card['vocabulary_size']} tokens), trained "
        "on the same docstrings (vocab.json, merges.txt in keras_lora/recipes/assets)"
    )


def pretrain(config: PretrainConfig) -> dict:
    """Train the base model from random weights and write its files.

    Args:
        config: the shape and schedule.

    Returns:
        The card (also written as `card.json`), with the SHA-256 of each
        file under "sha256".
    """
    import keras_hub
    import numpy as np

    started = time.perf_counter()
    train_docs, heldout_docs = data.docstring_split()
    tokenizer = tokenization.train_tokenizer(
        train_docs, vocabulary_size=config.vocab_size
    )
    rows = tokenization.token_windows(
        train_docs, tokenizer, config.seq + 1, shuffle_seed=config.seed
    )
    heldout = tokenization.token_windows(heldout_docs, tokenizer, config.seq + 1)
    keras.utils.set_random_seed(config.seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=config.layers,
        num_heads=config.heads,
        hidden_dim=config.hidden,
        intermediate_dim=config.intermediate,
        max_sequence_length=config.seq,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        config.steps,
        alpha=0.05,
        warmup_target=config.learning_rate,
        warmup_steps=max(1, config.steps // 20),
    )
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=0.01, global_clipnorm=1.0)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=10,
    )
    order = np.random.default_rng(config.seed).integers(
        0, len(rows), size=(config.steps, config.batch)
    )
    x, y = as_inputs(rows[order.reshape(-1)])
    print(
        f"pretraining {backbone.count_params():,} parameters on "
        f"{len(rows)} rows of {config.seq} tokens, {config.steps} steps",
        flush=True,
    )
    history = lm.fit(x, y, batch_size=config.batch, epochs=1, verbose=1)
    train_seconds = time.perf_counter() - started
    hx, hy = as_inputs(heldout)
    heldout_loss = float(
        lm.evaluate(hx, hy, batch_size=32, verbose=0, return_dict=True)["loss"]
    )

    os.makedirs(config.out, exist_ok=True)
    _save_weights(backbone, os.path.join(config.out, "model.safetensors"))
    _save_tokenizer(tokenizer, config.out)
    card = {
        "name": "keras-lora-gpt2-docstrings",
        "command": COMMAND,
        "config": dataclasses.asdict(config) | {"out": None},
        "architecture": _shape(backbone),
        "parameters": int(backbone.count_params()),
        "vocabulary_size": int(tokenizer.vocabulary_size()),
        "corpus": data.corpus_description()
        + f", train side ({len(train_docs)} docstrings; "
        f"held out: {', '.join(data.HELDOUT_DOCSTRING_MODULES)})",
        "steps": config.steps,
        "tokens_seen": config.steps * config.batch * config.seq,
        "final_train_loss": float(history.history["loss"][-1]),
        "heldout_loss": heldout_loss,
        "backend": keras.backend.backend(),
        "train_seconds": round(train_seconds, 1),
        "weights_dtype": "float16",
    }
    atomic_write(
        os.path.join(config.out, "card.json"),
        json.dumps(card, indent=2).encode("utf-8"),
    )
    card["sha256"] = {name: sha256(os.path.join(config.out, name)) for name in FILES}
    return card


def as_inputs(rows):
    """Token rows of `seq + 1` ids -> (`{"token_ids", "padding_mask"}`, labels)."""
    import numpy as np

    x = rows[:, :-1]
    return {"token_ids": x, "padding_mask": np.ones_like(x, dtype="bool")}, rows[:, 1:]


def _shape(backbone) -> dict:
    config = backbone.get_config()
    keys = ("vocabulary_size", "num_layers", "num_heads", "hidden_dim")
    keys += ("intermediate_dim", "max_sequence_length")
    return {k: config[k] for k in keys}


def _save_weights(backbone, path: str) -> None:
    import numpy as np
    from safetensors.numpy import save

    tensors = {
        f"{i:03d}:{w.path}": np.asarray(keras.ops.convert_to_numpy(w), "float16")
        for i, w in enumerate(backbone.weights)
    }
    atomic_write(path, save(tensors, metadata={"format": "keras-lora-pretrained"}))


def _save_tokenizer(tokenizer, out: str) -> None:
    vocab = {token: int(i) for token, i in tokenizer.vocabulary.items()}
    atomic_write(
        os.path.join(out, "vocab.json"),
        json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
    )
    merges = "\n".join(list(tokenizer.merges)) + "\n"
    atomic_write(os.path.join(out, "merges.txt"), merges.encode("utf-8"))


def sha256(path: str) -> str:
    """The SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: str = ASSETS, digests: dict | None = None) -> None:
    """Check the base model's files against their recorded SHA-256.

    Raises:
        FileNotFoundError: when a file is missing.
        ValueError: when a file's digest differs (corrupted or replaced).
    """
    digests = DIGESTS if digests is None else digests
    for name in FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"keras-lora's pretrained base lacks {path}: reinstall keras-lora "
                f"or rebuild it with `{COMMAND} --out {directory}`"
            )
        found = sha256(path)
        if found != digests[name]:
            raise ValueError(
                f"{path} has SHA-256 {found}, not the recorded {digests[name]}: "
                "the file is corrupted or was replaced; reinstall keras-lora "
                f"or rebuild it with `{COMMAND}`"
            )


def read_card(directory: str) -> dict:
    """The model card (`card.json`) of a pretrained model directory.

    Args:
        directory: the directory holding `card.json`.
    """
    with open(os.path.join(directory, "card.json")) as f:
        return json.load(f)


def load_pretrained(
    sequence_length: int = 128,
    with_preprocessor: bool = True,
    directory: str = ASSETS,
    digests: dict | None = None,
):
    """keras-lora's own small pretrained GPT-2, offline, checksums verified.

    Args:
        sequence_length: the preprocessor's sequence length (at most the
            model's 128).
        with_preprocessor: attach a `GPT2CausalLMPreprocessor` (for text
            in, `generate`); without one the model takes token ids.
        directory: where the files are (default: the package's copy).
        digests: the expected SHA-256 per file (default: `DIGESTS`).

    Returns:
        A `keras_hub.models.GPT2CausalLM` with its preprocessor, float32.

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a file whose checksum differs, or a sequence length
            the model cannot take.

    Example:

    >>> lm = load_pretrained(sequence_length=16)
    >>> lm.backbone.num_layers
    4
    """
    import keras_hub
    from safetensors.numpy import load_file

    verify(directory, digests)
    card = read_card(directory)
    shape = card["architecture"]
    if not 0 < sequence_length <= shape["max_sequence_length"]:
        raise ValueError(
            f"sequence_length must be in 1..{shape['max_sequence_length']} "
            f"for this model, got {sequence_length}"
        )
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=os.path.join(directory, "vocab.json"),
        merges=os.path.join(directory, "merges.txt"),
    )
    backbone = keras_hub.models.GPT2Backbone(**shape)
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    values = [tensors[k] for k in sorted(tensors)]
    if len(values) != len(backbone.weights):
        raise ValueError(
            f"{directory}: {len(values)} tensors for {len(backbone.weights)} weights"
        )
    for weight, value in zip(backbone.weights, values, strict=True):
        weight.assign(value.astype("float32"))
    preprocessor = None
    if with_preprocessor:
        preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
            tokenizer=tokenizer, sequence_length=sequence_length
        )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


def main(argv=None) -> int:
    """`python -m keras_lora.recipes.pretrain --out DIR [--steps N]`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--batch", type=int, default=PretrainConfig.batch)
    args = parser.parse_args(argv)
    card = pretrain(PretrainConfig(out=args.out, steps=args.steps, batch=args.batch))
    print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
