"""[packing]: length buckets trace one step function per bucket at most;
a packed row computes, for each of its examples, the loss and the LoRA
gradients the example gives alone; families that cannot pack say why; a
packed `keras-lora sft` run's eval loss is what transformers + PEFT compute
on its adapter, each example alone."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import keras_hub
import numpy as np
import pytest

from keras_lora import inject_lora, lora_layers
from keras_lora.cli import main
from keras_lora.recipes.sft.batches import padded_arrays
from keras_lora.recipes.sft.buckets import bucket_lengths, bucketed_steps, packed_rows
from keras_lora.recipes.sft.encode import Encoded
from keras_lora.recipes.sft.feeding import StepTraces, fit_data
from keras_lora.recipes.sft.packed_model import packed_causal_lm
from keras_lora.recipes.sft.packing import pack_rows, packed_arrays
from tests import sft_fixtures as fx
from tests.family_cases import CASES, FamilyCase
from tests.helpers import randomize_lora_b, to_numpy

VOCAB = 40


def _examples(lengths, seed=0) -> list[Encoded]:
    """Random token examples; the first third of each is prompt (-100)."""
    rng = np.random.default_rng(seed)
    out = []
    for line, size in enumerate(lengths, start=1):
        ids = rng.integers(1, VOCAB, size).tolist()
        labels = [-100 if i < size // 3 else t for i, t in enumerate(ids)]
        out.append(Encoded(ids, labels, line=line))
    return out


def test_pack_rows_places_every_example_whole_within_capacity():
    lengths = [30, 3, 17, 9, 64, 1, 40, 22, 5, 12]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # 203 tokens need at least 4 rows of 64; best fit reaches that bound.
    assert len(rows) == 4
    with pytest.raises(ValueError, match="does not fit a row of 8"):
        pack_rows([9], 8)


def _tiny_model():
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    x = keras.layers.Embedding(VOCAB, 8)(token_ids)
    x = x * keras.ops.expand_dims(keras.ops.cast(padding_mask, x.dtype), -1)
    logits = keras.layers.Dense(VOCAB)(x)
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, logits)


def test_buckets_trace_no_more_step_functions_than_buckets():
    lengths = [3, 5, 7, 9, 12, 15, 20, 26, 31, 40, 47, 55, 60] * 2
    batches = bucketed_steps(_examples(lengths), 2, 10, 0, seed=1, max_length=64)
    buckets = bucket_lengths(64)
    used = {shape[1] for shape in batches.shapes}
    assert used <= set(buckets) and len(used) >= 4
    # Each batch is one bucket's: every example in it needs that bucket.
    for x, _, _ in batches.steps:
        longest = int(x["padding_mask"].sum(axis=1).max())
        length = x["token_ids"].shape[1]
        assert length == min(b for b in buckets if b >= longest)
    model = _tiny_model()
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum"
        ),
    )
    traces = StepTraces(model)
    model.fit(fit_data(batches), epochs=1, verbose=0)
    if keras.backend.backend() == "torch":
        # Eager: the step's Python body runs once per step, nothing traced.
        assert traces.traced is None and traces.count == 10
    else:
        assert 1 <= traces.traced <= len(used)


def _window(case: FamilyCase) -> FamilyCase:
    """`case` with a sliding window shorter than the test's examples, where
    the family has one, so it takes part in what is compared."""
    config = dict(case.backbone_config)
    if case.id == "mistral":
        config["sliding_window"] = 6
    if case.id in ("gemma2", "gemma3"):
        config.update(use_sliding_window_attention=True, sliding_window_size=6)
    return dataclasses.replace(case, backbone_config=config)


# Every family that packs: the rotary ones (GPT-2's refusal is tested below).
PACKING_CASES = [_window(c) for c in CASES if c.family.decoder_stack is not None]


def _token_losses(model, x, y) -> np.ndarray:
    if keras.backend.backend() == "jax":
        # One compiled forward: eager JAX compiles every op on its own.
        logits = model.predict_on_batch(x)
    else:
        logits = model(x, training=False)
    losses = keras.losses.sparse_categorical_crossentropy(
        y, keras.ops.cast(logits, "float32"), from_logits=True
    )
    return to_numpy(losses).astype("float64")


def _sgd_gradients(model, x, y, weights) -> list[np.ndarray]:
    """The LoRA factors' gradients of sum(token loss * weights): one SGD
    step at learning rate 1 moves each variable by minus its gradient."""
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum"
        ),
    )
    factors = [v for layer in lora_layers(model) for v in (layer.lora_a, layer.lora_b)]
    before = [to_numpy(v).copy() for v in factors]
    model.train_on_batch(x, y, sample_weight=weights)
    grads = [b - to_numpy(v) for b, v in zip(before, factors, strict=True)]
    for value, v in zip(before, factors, strict=True):
        v.assign(value)
    return grads


@pytest.mark.parametrize("case", PACKING_CASES, ids=lambda c: c.id)
def test_packed_row_matches_each_example_alone(case):
    keras.utils.set_random_seed(0)
    lm = case.make_task(case.make_backbone())
    roles = [p.role for p in case.family.projections]
    # Attention and the last MLP projection: every kind of kernel layout.
    inject_lora(lm, rank=2, targets=("query", "value", roles[-1]))
    randomize_lora_b(lm, scale=0.3)
    examples = _examples([9, 5, 7, 3])
    [row] = packed_rows(examples, 24)
    packed = packed_causal_lm(lm)
    x, y, mask = packed_arrays([row], 32, pad_id=0)
    losses = _token_losses(packed, x, y)[0]
    start = 0
    for example in row:
        size = len(example.input_ids)
        alone_x, alone_y, alone_mask = padded_arrays([example], 16, 0)
        alone = _token_losses(lm, alone_x, alone_y)[0]
        got = (losses[start : start + size] * mask[0, start : start + size]).sum()
        want = (alone * alone_mask[0]).sum()
        assert got == pytest.approx(want, abs=1e-4)
        start += size

    # Gradients: the same examples, unpacked, under the same normalisation.
    grads = _sgd_gradients(packed, x, y, mask / mask.sum())
    ux, uy, umask = padded_arrays(examples, 16, 0)
    want = _sgd_gradients(lm, ux, uy, umask / umask.sum())
    scale = max(float(np.abs(g).max()) for g in want)
    assert scale > 1e-3
    for got, expected in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4 * max(scale, 1.0))


def test_gpt2_cannot_pack_and_says_why():
    gpt2 = keras_hub.models.GPT2CausalLM(
        keras_hub.models.GPT2Backbone(
            vocabulary_size=VOCAB,
            num_layers=1,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=32,
        ),
        preprocessor=None,
    )
    with pytest.raises(ValueError, match="GPT-2: .*learned absolute position"):
        packed_causal_lm(gpt2)


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_packed_sft_eval_loss_is_what_peft_computes_alone(tmp_path, family):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    del torch
    save = {"llama3": fx.save_tiny_llama, "gemma": fx.save_tiny_gemma}[family]
    # Rows long enough for several of the family's encoded examples.
    max_length = {"llama3": "96", "gemma": "160"}[family]
    model = save(fx.build_model_dir(family, str(tmp_path / family)))
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES * 3)
    out = str(tmp_path / "out")
    argv = ["sft", "--model", model, "--data", data, "--out", out]
    settings = ["--steps", "3", "--batch", "1", "--learning-rate", "0.01"]
    settings += ["--generate-prompts", "0"]  # tested in test_sft_generate
    assert main([*argv, *settings, "--packing", "--max-length", max_length]) == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["settings"]["packing"] is True
    assert report["examples_per_row"] > 1.0 and report["rows"] >= 1
    assert 0.0 <= report["padding_fraction"] < 0.5
    assert len(report["train_loss"]) == 3
    shapes = report["batch_shapes"]
    if keras.backend.backend() == "torch":
        assert report["traced_step_functions"] is None
    else:
        assert 1 <= report["traced_step_functions"] <= len(shapes)
    assert report["eval_loss_after"] < report["eval_loss_before"]

    assert main([*argv, "--inspect", "--max-length", max_length]) == 0
    with open(os.path.join(out, "encoded.jsonl")) as f:
        encoded = [json.loads(line) for line in f]
    base = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    assert fx.hf_eval_loss(base, encoded) == pytest.approx(
        report["eval_loss_before"], rel=2e-3
    )
    tuned = peft.PeftModel.from_pretrained(base, os.path.join(out, "peft")).eval()
    assert fx.hf_eval_loss(tuned, encoded) == pytest.approx(
        report["eval_loss_after"], rel=2e-3
    )
