"""`keras-lora sft` training: a Hugging Face model directory, LoRA, `fit`.

The model comes from keras-hub's own converters
(`keras_hub.models.CausalLM.from_preset(dir, preprocessor=None)`, offline
for a local directory); `inject_lora` adapts the family's default targets
(or `targets`: "all-linear" and the token embedding included) with the
run's init and DoRA settings; plain `model.fit` trains with the loss mask
as `sample_weight` on batches of a few lengths, or packed rows (see
`buckets`, `feeding`, `packed_model`). Losses are those of `evaluation`.

Everything is read and encoded before `OUT` is touched; the adapter, the
PEFT directory, `loss.png` and the report are written at the end, each
through a temporary name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import keras
import numpy as np

from keras_lora import (
    LoraEmbedding,
    inject_lora,
    load_adapter,
    lora_layers,
    save_adapter,
    trainable_summary,
)
from keras_lora.families import family_of
from keras_lora.files import atomic_write, staging_directory
from keras_lora.interop import export_peft
from keras_lora.interop.hf_model import check_hf_exportable
from keras_lora.interop.quantized_load import (
    load_quantized_causal_lm,
    load_quantized_preset,
)
from keras_lora.recipes.sft.buckets import plan_steps
from keras_lora.recipes.sft.config import SftConfig, check_family_targets
from keras_lora.recipes.sft.data import read_examples
from keras_lora.recipes.sft.encode import EncodedData, encode_examples
from keras_lora.recipes.sft.evaluation import EvalEvery, eval_loss
from keras_lora.recipes.sft.feeding import StepTraces, fit_data, throughput
from keras_lora.recipes.sft.generation import EvalGenerations
from keras_lora.recipes.sft.inspection import describe_shape, prepare_data
from keras_lora.recipes.sft.loss_plot import LOSS_PLOT, loss_png, plot_available
from keras_lora.recipes.sft.memory import (
    distribution_scope,
    training_model,
)
from keras_lora.recipes.sft.merged_hf import check_merged_dir, write_merged_hf
from keras_lora.recipes.sft.preset_tokenizer import (
    is_keras_hub_preset,
    model_reference,
    preset_load_error,
)
from keras_lora.recipes.sft.progress import Progress
from keras_lora.recipes.sft.resume import checkpoint_callback, find_resume_point
from keras_lora.recipes.training import StepLog

__all__ = ["REPORT", "load_causal_lm", "make_optimizer", "train"]

REPORT = "report.json"


def load_causal_lm(model_dir: str, quantize: str | None = None):
    """The keras-hub causal LM of a Hugging Face directory (or a keras-hub
    preset), no preprocessor, its base quantized to `quantize` if given.

    With `quantize`, the projections are built quantized and filled as
    their weights are read (`keras_lora.interop.quantized_load`: no float
    copy of them exists), from a Hugging Face directory or a keras-hub
    preset; the model equals a float load followed by `model.quantize`.

    Args:
        model_dir: config.json + model.safetensors of a family keras-hub
            converts (GPT-2, Llama, Mistral, Qwen2, Gemma, ...), or a
            keras-hub preset name or `save_to_preset` directory.
        quantize: "int8", "int4" or None (float).

    Returns:
        The keras-hub `CausalLM`.

    Raises:
        ValueError: when keras-hub cannot load it, naming the directory.
    """
    import keras_hub

    if is_keras_hub_preset(model_dir):
        try:
            if quantize is not None:
                return load_quantized_preset(model_dir, quantize)
            return keras_hub.models.CausalLM.from_preset(model_dir, preprocessor=None)
        except Exception as error:  # keras-hub and its download clients raise many.
            raise preset_load_error(model_dir, error) from None
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(
            f"{model_dir} has no config.json: training needs the model's "
            "weights too (a Hugging Face directory saved with save_pretrained)"
        )
    try:
        if quantize is not None:
            return load_quantized_causal_lm(model_dir, quantize)
        return keras_hub.models.CausalLM.from_preset(model_dir, preprocessor=None)
    except (ValueError, KeyError) as error:
        raise ValueError(f"keras-hub cannot load {model_dir}: {error}") from None


def make_optimizer(config: SftConfig) -> keras.optimizers.Optimizer:
    """The optimizer of `config`: Keras's AdamW (its defaults) or plain SGD.

    Example:

    >>> config = SftConfig("m", "d.jsonl", "o", optimizer="sgd")
    >>> type(make_optimizer(config)).__name__
    'SGD'
    """
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=config.learning_rate)
    return keras.optimizers.AdamW(learning_rate=config.learning_rate)


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
        hold the adapter, `OUT/loss.png` charts the losses (when matplotlib
        is installed; else the report's `notes` say so).

    Raises:
        DataError: bad data; nothing is written.
        ValueError: a model keras-hub or keras-lora does not support; a
            `resume` whose settings differ from the checkpoint's.
        FileNotFoundError: `resume` with no checkpoint in `OUT`.

    Example:

    >>> config = SftConfig("HF_DIR", "train.jsonl", "out", steps=10, use_dora=True)
    >>> report = train(config)  # doctest: +SKIP
    >>> report["eval_loss_after"] < report["eval_loss_before"]  # doctest: +SKIP
    True
    """
    # The distribution (and its batch check) comes first, and every variable
    # is made inside its scope.
    with distribution_scope(config):
        return _train(config)


def _train(config: SftConfig) -> dict:
    """`train` inside the run's distribution scope."""
    resume = find_resume_point(config)  # Refused settings read nothing.
    if config.merged_hf is not None:
        check_merged_dir(config.merged_hf)
    tokenizer, examples, data = prepare_data(config)
    train_examples, eval_examples, eval_source = _split(config, data, tokenizer)
    if not eval_examples:
        raise ValueError("no evaluation example keeps an answer within --max-length")
    generations = EvalGenerations.of(config, examples, eval_examples, tokenizer)
    plot_note = plot_available()
    pad_id = _pad_id(tokenizer)
    batches = plan_steps(config, train_examples, pad_id)
    total_steps = len(batches.steps)
    done = 0 if resume is None else resume.step
    if done > total_steps:
        raise ValueError(
            f"--resume: the checkpoint {resume.directory} holds {done} steps, "
            f"more than this run's {total_steps}; give --steps {done} or more"
        )
    keras.utils.set_random_seed(config.seed)
    lm = load_causal_lm(config.model, config.quantize)
    family = family_of(lm)
    if config.merged_hf is not None:
        check_hf_exportable(lm)  # Before training, not after.
    targets = check_family_targets(config, family)
    inject_lora(lm, targets=targets, **dataclasses.asdict(config.lora))
    _check_embeddings(lm, family)
    if config.init_adapter is not None:
        load_adapter(lm, config.init_adapter)
    # `fit` trains `trainer` over the LM's own (LoRA) layers: the LM, its
    # packed or chunked-loss form.
    trainer = training_model(lm, config, make_optimizer(config))
    packed = config.max_length if config.packing else None
    # Before any checkpoint is restored: the starting adapter's answers.
    generations.run(lm, "before")
    if resume is None:
        before = eval_loss(trainer, eval_examples, config.batch, pad_id, packed)
    else:
        resume.restore(trainer)
        before = resume.eval_loss_before
    steps = StepLog()
    every = None
    if config.eval_every is not None:
        every = EvalEvery(
            config.eval_every,
            eval_examples,
            config.batch,
            pad_id,
            packed_length=packed,
            first_step=done,
        )
    earlier_losses = [] if resume is None else resume.train_loss
    earlier_evals = [] if resume is None else [tuple(p) for p in resume.eval_loss_every]

    def progress() -> dict:
        points = earlier_evals + ([] if every is None else every.losses)
        return {
            "train_loss": earlier_losses + steps.losses,
            "eval_loss_before": before,
            "eval_loss_every": [list(point) for point in points],
        }

    callbacks = [steps, *([] if every is None else [every])]
    callbacks.append(checkpoint_callback(config, resume is not None, progress))
    if not config.quiet:
        callbacks.append(Progress(total_steps, done, steps))
    # Resumed: the steps already trained are skipped.
    remaining = batches.after(done)
    traces = StepTraces(trainer)
    if remaining.steps:
        trainer.fit(
            fit_data(remaining),
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
    eval_points = earlier_evals + ([] if every is None else every.losses)
    after = eval_loss(trainer, eval_examples, config.batch, pad_id, packed)
    generations.run(lm, "after")
    tokens_per_s, compile_s = throughput(remaining, steps.step_times)
    report = {
        "model": config.model,
        "family": family.name,
        "data": {"file": config.data, "shape": describe_shape(examples[0])}
        | data.report(),
        "eval_data": eval_source,
        "eval_examples": len(eval_examples),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "eval_loss_every": [[step, loss] for step, loss in eval_points],
        "train_loss": earlier_losses + steps.losses,
        "resumed_from": None if resume is None else resume.directory,
        "padding_fraction": batches.padding_fraction,
        "train_tokens_per_s": tokens_per_s,
        "compile_s": compile_s,
        "rows": batches.rows,
        "examples_per_row": batches.examples_per_row,
        "traced_step_functions": traces.traced,
        "batch_shapes": [list(shape) for shape in batches.shapes],
        "steps": total_steps,
        "generations": generations.records(),
        "merged_hf": config.merged_hf and os.path.abspath(config.merged_hf),
        "epochs": config.epochs,
        "loss_plot": LOSS_PLOT if plot_note is None else None,
        "notes": [] if plot_note is None else [plot_note],
        "settings": {
            "rank": config.rank,
            "alpha": config.alpha,
            "dropout": config.dropout,
            "init": config.init,
            "use_dora": config.use_dora,
            "targets": list(targets),
            "adapted_layers": len(lora_layers(lm)),
            "trainable_params": trainable_summary(lm)["trainable"],
            "batch": config.batch,
            "learning_rate": config.learning_rate,
            "optimizer": config.optimizer,
            "eval_every": config.eval_every,
            "max_length": config.max_length,
            "loss_on": config.loss_on,
            "seed": config.seed,
            "quantize": config.quantize,
            "remat": config.remat,
            "chunked_loss": config.chunked_loss,
            "distribution": config.distribution,
            "init_adapter": config.init_adapter,
            "checkpoint_every": config.checkpoint_every,
            "generate_tokens": config.generate_tokens,
            "packing": config.packing,
            "buckets": config.buckets,
            "backend": keras.backend.backend(),
        },
    }
    png = None
    if plot_note is None:
        points = [(0, before), *eval_points]
        if not eval_points or eval_points[-1][0] != total_steps:
            points.append((total_steps, after))
        title = f"{family.name} sft: {os.path.basename(config.data)}"
        png = loss_png(earlier_losses + steps.losses, points, title)
    _write_outputs(lm, config, report, png)
    return report


def _check_embeddings(lm, family) -> None:
    """Refuse, before training, an embedding LoRA that OUT/peft cannot hold:
    one on an embedding other than the family's token embedding."""
    token_embedding = getattr(lm.backbone, family.embedding, None)
    for layer in lora_layers(lm):
        if isinstance(layer, LoraEmbedding) and layer is not token_embedding:
            raise ValueError(
                f"--targets matched the embedding '{layer.name}': OUT/peft "
                f"holds LoRA on the token embedding '{family.embedding}' only; "
                f"leave '{layer.name}' out of --targets"
            )


def _pad_id(tokenizer) -> int:
    """The pad token's id, else the EOS's, else 0 (pads are never targets)."""
    for name in ("pad_token", "eos_token"):
        token = tokenizer.special_tokens.get(name)
        if token is not None and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return 0


def _write_outputs(lm, config: SftConfig, report: dict, png: bytes | None) -> None:
    """OUT/adapter, OUT/peft (each built beside, then moved in), the merged
    model (`merged_hf`, which merges `lm`), loss.png (when drawn),
    report.json."""
    os.makedirs(config.out, exist_ok=True)
    for name, write in (
        ("adapter", lambda path: save_adapter(lm, path)),
        (
            "peft",
            lambda path: export_peft(
                lm, path, base_model_name_or_path=model_reference(config.model)
            ),
        ),
    ):
        final = os.path.join(config.out, name)
        staging = staging_directory(config.out, f".{name}-")
        try:
            write(os.path.join(staging, name))
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if config.merged_hf is not None:
        write_merged_hf(lm, config.merged_hf, config.model, config.chat_template)
    plot = os.path.join(config.out, LOSS_PLOT)
    if png is not None:
        atomic_write(plot, png)
    elif os.path.isfile(plot):
        os.remove(plot)  # An earlier run's chart would pass for this one's.
    atomic_write(
        os.path.join(config.out, REPORT),
        (json.dumps(report, indent=2) + "\n").encode("utf-8"),
    )
