"""`keras-lora sft` training: a Hugging Face model directory, LoRA, `fit`.

The model comes from keras-hub's own converters
(`keras_hub.models.CausalLM.from_preset(dir, preprocessor=None)`, offline
for a local directory); `inject_lora` adapts the family's default targets
(or `targets`); plain `model.fit` trains with the loss mask as
`sample_weight` (see `batches`). Losses are the mean token cross-entropy
over all label positions of the evaluated examples (token-weighted), as
transformers computes it with `labels`.

Everything is read and encoded before `OUT` is touched; the adapter, the
PEFT directory and the report are written at the end, each through a
temporary name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import keras
import numpy as np

from keras_lora import inject_lora, save_adapter
from keras_lora.families import family_of
from keras_lora.files import atomic_write
from keras_lora.interop import export_peft
from keras_lora.recipes.sft.batches import make_batches, padded_arrays, sequence_length
from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.data import read_examples
from keras_lora.recipes.sft.encode import Encoded, EncodedData, encode_examples
from keras_lora.recipes.sft.inspection import describe_shape, prepare_data

__all__ = ["REPORT", "eval_loss", "load_causal_lm", "train"]

REPORT = "report.json"


def load_causal_lm(model_dir: str):
    """The keras-hub causal LM of a Hugging Face directory, no preprocessor.

    Args:
        model_dir: config.json + model.safetensors of a family keras-hub
            converts (GPT-2, Llama, Mistral, Qwen2, Gemma, ...).

    Returns:
        The keras-hub `CausalLM`.

    Raises:
        ValueError: when keras-hub cannot load it, naming the directory.
    """
    import keras_hub

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(
            f"{model_dir} has no config.json: training needs the model's "
            "weights too (a Hugging Face directory saved with save_pretrained)"
        )
    try:
        return keras_hub.models.CausalLM.from_preset(model_dir, preprocessor=None)
    except (ValueError, KeyError) as error:
        raise ValueError(f"keras-hub cannot load {model_dir}: {error}") from None


def eval_loss(model, examples: list[Encoded], batch: int, pad_id: int) -> float:
    """Mean token cross-entropy over all label positions of `examples`.

    Args:
        model: a causal LM taking `{"token_ids", "padding_mask"}`.
        examples: encoded examples.
        batch: examples per forward pass.
        pad_id: the padding id.

    Returns:
        sum of per-token losses / number of label tokens (next-token
        targets, as transformers shifts `labels`).
    """
    length = sequence_length(examples)
    total, count = 0.0, 0.0
    for start in range(0, len(examples), batch):
        x, y, mask = padded_arrays(examples[start : start + batch], length, pad_id)
        logits = model(x, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(
            y, keras.ops.cast(logits, "float32"), from_logits=True
        )
        losses = np.asarray(keras.ops.convert_to_numpy(losses), dtype="float64")
        total += float((losses * mask).sum())
        count += float(mask.sum())
    return total / max(count, 1.0)


class _StepLosses(keras.callbacks.Callback):
    """Each step's own loss (Keras logs the running mean of the epoch)."""

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []
        self.times: list[float] = []
        self._previous_mean = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        mean = float(logs["loss"])
        self.losses.append((batch + 1) * mean - batch * self._previous_mean)
        self._previous_mean = mean


def _split(config: SftConfig, data: EncodedData, tokenizer):
    """(train examples, eval examples, where the eval examples come from)."""
    if config.eval_data is not None:
        examples = read_examples(config.eval_data, config.columns)
        held = encode_examples(
            examples,
            tokenizer,
            max_length=config.max_length,
            loss_on=config.loss_on,
            source=os.path.basename(config.eval_data),
        )
        return data.examples, held.examples, config.eval_data
    if config.eval_split > 0:
        order = np.random.default_rng(config.seed).permutation(len(data.examples))
        held = max(1, round(config.eval_split * len(order)))
        if held >= len(order):
            raise ValueError("--eval-split leaves no training example")
        chosen = set(order[:held].tolist())
        train = [e for i, e in enumerate(data.examples) if i not in chosen]
        evals = [e for i, e in enumerate(data.examples) if i in chosen]
        return train, evals, f"{config.eval_split:g} of {config.data}"
    return data.examples, data.examples, f"{config.data} (the training data)"


def train(config: SftConfig) -> dict:
    """Fine-tune the model of `config` on its data with LoRA.

    Args:
        config: the run's settings.

    Returns:
        The report (also `OUT/report.json`); `OUT/adapter/` and `OUT/peft/`
        hold the adapter.

    Raises:
        DataError: bad data; nothing is written.
        ValueError: a model keras-hub or keras-lora does not support.

    Example:

    >>> config = SftConfig("HF_DIR", "train.jsonl", "out", steps=10)
    >>> report = train(config)  # doctest: +SKIP
    >>> report["eval_loss_after"] < report["eval_loss_before"]  # doctest: +SKIP
    True
    """
    tokenizer, examples, data = prepare_data(config)
    train_examples, eval_examples, eval_source = _split(config, data, tokenizer)
    if not eval_examples:
        raise ValueError("no evaluation example keeps an answer within --max-length")
    pad_id = _pad_id(tokenizer)
    batches = make_batches(
        train_examples, config.batch, config.steps, pad_id, config.seed
    )
    keras.utils.set_random_seed(config.seed)
    lm = load_causal_lm(config.model)
    family = family_of(lm)
    targets = config.targets or family.default_targets
    inject_lora(
        lm,
        rank=config.rank,
        alpha=config.alpha,
        targets=targets,
        dropout=config.dropout,
        seed=config.seed,
    )
    lm.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum"
        ),
    )
    before = eval_loss(lm, eval_examples, config.batch, pad_id)
    steps = _StepLosses()
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
    after = eval_loss(lm, eval_examples, config.batch, pad_id)
    # The first step includes tracing and compiling; the others are steady.
    steady = sum(steps.times[1:]) / max(len(steps.times) - 1, 1)
    tokens = int(batches.x["padding_mask"].sum())
    report = {
        "model": config.model,
        "family": family.name,
        "data": {"file": config.data, "shape": describe_shape(examples[0])}
        | data.report(),
        "eval_data": eval_source,
        "eval_examples": len(eval_examples),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_loss": steps.losses,
        "padding_fraction": batches.padding_fraction,
        "train_tokens_per_s": tokens / seconds if seconds > 0 else None,
        "compile_s": max(steps.times[0] - steady, 0.0) if steps.times else None,
        "steps": config.steps,
        "settings": {
            "rank": config.rank,
            "alpha": config.alpha,
            "dropout": config.dropout,
            "targets": list(targets),
            "batch": config.batch,
            "learning_rate": config.learning_rate,
            "optimizer": "adamw",
            "max_length": config.max_length,
            "loss_on": config.loss_on,
            "seed": config.seed,
            "backend": keras.backend.backend(),
        },
    }
    _write_outputs(lm, config, report)
    return report


def _pad_id(tokenizer) -> int:
    """The pad token's id, else the EOS's, else 0 (pads are never targets)."""
    for name in ("pad_token", "eos_token"):
        token = tokenizer.special_tokens.get(name)
        if token is not None and tokenizer.tokenizer.token_to_id(token) is not None:
            return tokenizer.tokenizer.token_to_id(token)
    return 0


def _write_outputs(lm, config: SftConfig, report: dict) -> None:
    """OUT/adapter, OUT/peft (each built beside, then moved in), report.json."""
    os.makedirs(config.out, exist_ok=True)
    for name, write in (
        ("adapter", lambda path: save_adapter(lm, path)),
        (
            "peft",
            lambda path: export_peft(
                lm, path, base_model_name_or_path=os.path.abspath(config.model)
            ),
        ),
    ):
        final = os.path.join(config.out, name)
        staging = tempfile.mkdtemp(dir=config.out, prefix=f".{name}-")
        try:
            write(os.path.join(staging, name))
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    atomic_write(
        os.path.join(config.out, REPORT),
        (json.dumps(report, indent=2) + "\n").encode("utf-8"),
    )
