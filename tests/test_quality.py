"""The demo's quality part: the shipped pretrained base, the corpora, LoRA vs full.

Runs on every backend, on a tiny configuration of the real shipped base.
"""

from __future__ import annotations

import json
import os
import shutil

import keras
import numpy as np
import pytest

from keras_lora.recipes import data, pretrain, quality, quality_report, tokenization


def test_shipped_base_is_small_and_recorded():
    paths = [os.path.join(pretrain.ASSETS, name) for name in pretrain.FILES]
    assert sum(map(os.path.getsize, paths)) <= 16 * 2**20
    for name in pretrain.FILES:
        assert len(pretrain.DIGESTS[name]) == 64, name
    pretrain.verify()  # The package's files match the recorded digests.
    assert "keras-lora's own small GPT-2" in pretrain.description()


def test_shipped_base_loads_offline_and_predicts_its_domain():
    lm = pretrain.load_pretrained(sequence_length=32)
    tokenizer = lm.preprocessor.tokenizer
    _, heldout = data.docstring_split()
    rows = tokenization.token_windows(heldout, tokenizer, 33, max_rows=8)
    x, y = pretrain.as_inputs(rows)
    # Calling the model skips the preprocessor: it takes token ids.
    logits = np.asarray(keras.ops.convert_to_numpy(lm(x)), "float64")
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    loss = -np.take_along_axis(logp, y[..., None], -1).mean()
    # A random model of this vocabulary scores ln(4096) = 8.3; the trained
    # one does far better on docstrings it never saw.
    assert loss < 0.75 * np.log(tokenizer.vocabulary_size()), loss


def test_corrupted_base_is_refused(tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(pretrain.ASSETS, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(ValueError, match="SHA-256 .* corrupted or was replaced"):
        pretrain.load_pretrained(16, directory=str(copy))
    shutil.copy(os.path.join(pretrain.ASSETS, "model.safetensors"), copy)
    os.remove(copy / "vocab.json")
    with pytest.raises(FileNotFoundError, match="lacks .*vocab.json"):
        pretrain.load_pretrained(16, directory=str(copy))


def test_splits_never_overlap():
    train, heldout = data.python_code_split(max_chars=200_000)
    assert train and heldout and set(train).isdisjoint(heldout)
    assert not any('"""' in doc for doc in train[:50])  # Docstrings stripped.
    doc_train, doc_heldout = data.docstring_split()
    assert doc_heldout and set(doc_train).isdisjoint(doc_heldout)
    assert set(data.HELDOUT_CODE_MODULES) < set(data.CODE_MODULES)


TINY = dict(
    steps=16,
    batch=8,
    seq=64,
    eval_every=8,
    eval_rows=8,
    max_length=12,
    prompts=("def f(self",),
    lora_learning_rate=5e-3,
    full_learning_rate=2e-3,
    update_weights=(0.5,),  # One point: each LoRA weight traces anew.
)


def test_quality_config_is_checked():
    with pytest.raises(ValueError, match="sequence of targets"):
        quality.QualityConfig(out="o", lora_targets="query")
    with pytest.raises(ValueError, match="unknown quality run"):
        quality.QualityConfig(out="o", runs=("qlora",))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        quality.QualityConfig(out="o", steps=0)
    config = quality.QualityConfig(out="o", runs=("peft",), lora_targets=["query"])
    assert config.runs == ("lora", "full", "peft")
    assert config.lora_targets == ("query",)
    assert config.learning_rate("builtin") == config.builtin_learning_rate
    with pytest.raises(ValueError, match="embedding_rank must be a positive"):
        quality.QualityConfig(out="o", embedding_rank=0)
    with pytest.raises(ValueError, match="embedding_alpha must be positive"):
        quality.QualityConfig(out="o", embedding_alpha=-1.0)
    for weights in ((1.0,), (0.0,), "0.5", 0.5, (True,)):
        with pytest.raises(ValueError, match=r"update_weights must be .* in \(0, 1\)"):
            quality.QualityConfig(out="o", update_weights=weights)
    assert quality.QualityConfig(out="o", update_weights=[0.5]).update_weights == (0.5,)


@pytest.mark.parametrize("run", ["lora", "full"])
def test_weighted_update_is_the_update_times_w(run):
    # The dial after training: LoRA's adapter re-weighted with
    # add_weighted_adapter, full fine-tuning interpolated W0 + w (W1 - W0).
    # Each loss must equal the model with that update made by hand.
    keras.utils.set_random_seed(0)
    lm = pretrain.load_pretrained(16, with_preprocessor=False)
    config = quality.QualityConfig(out="o", update_weights=(0.5, 0.25), batch=4)
    if run == "lora":
        quality._inject(lm, config)
    lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    rows = {
        "code_heldout": rng.integers(1, 4096, (4, 17)),
        "doc_heldout": rng.integers(1, 4096, (4, 17)),
    }
    base = [v.numpy() for v in lm.trainable_weights]
    # "Trained" weights: the base moved at random (LoRA's factors both
    # nonzero). A LoRA update is linear in B: scaling B weights it.
    trained = [w + rng.normal(0, 0.05, w.shape).astype("float32") for w in base]
    expected = []
    for weight in config.update_weights:
        for v, w0, w1 in zip(lm.trainable_weights, base, trained, strict=True):
            if run == "full":
                v.assign(w0 + weight * (w1 - w0))
            else:
                v.assign(weight * w1 if v.name == "lora_b" else w1)
        expected.append(
            [quality._evaluate(lm, rows[k], 4) for k in ("code_heldout", "doc_heldout")]
        )
    for v, w1 in zip(lm.trainable_weights, trained, strict=True):
        v.assign(w1)
    unweighted = quality._evaluate(lm, rows["code_heldout"], 4)
    sweep = quality._weighted_update(lm, run, config, rows, base)
    assert [p["weight"] for p in sweep] == [0.5, 0.25]
    got = [[p["heldout"], p["original_domain"]] for p in sweep]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert abs(got[0][0] - unweighted) > 1e-3  # The dial moved the loss.


def test_separate_embedding_settings_go_through_wrap_layers():
    # With an embedding rank set, the layers are wrapped one by one
    # (`wrap_layers`); projections keep the LoRA rank and alpha.
    lm = pretrain.load_pretrained(16, with_preprocessor=False)
    x = {"token_ids": np.ones((1, 8), "int32"), "padding_mask": np.ones((1, 8), bool)}
    before = keras.ops.convert_to_numpy(lm(x))
    config = quality.QualityConfig(
        out="o",
        lora_targets=("query", "value"),
        lora_rank=2,
        embedding_rank=4,
        embedding_alpha=4.0,
    )
    quality._inject(lm, config)
    # q and v of 4 blocks at rank 2: 4 x 2 x (128 + 128) x 2.
    assert sum(int(np.prod(w.shape)) for w in lm.trainable_weights) == 4_096
    np.testing.assert_allclose(keras.ops.convert_to_numpy(lm(x)), before, atol=1e-5)


def test_quality_part_end_to_end(tmp_path, monkeypatch):
    # PEFT is judged once, in the torch pass (below); here it is "missing",
    # which must skip it with the reason, not fail.
    monkeypatch.setattr(quality, "missing_peft_modules", lambda: ["peft"])
    config = quality.QualityConfig(out=str(tmp_path), **TINY)
    result = quality.quality(config)
    with open(tmp_path / "quality.json") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    keys = {
        "trainable_params",
        "heldout_before",
        "heldout_after",
        "original_domain_before",
        "original_domain_after",
    }
    runs = result["runs"]
    assert list(runs) == ["lora", "full", "builtin"]
    assert result["skipped"] == {"peft": "peft not installed"}
    lora, full, builtin = runs["lora"], runs["full"], runs["builtin"]
    for run in runs.values():
        assert keys <= set(run)
        assert run["peak_memory_bytes"] > 2**20 and run["step_seconds"] > 0
        # Every run starts from the same base.
        assert run["heldout_before"] == pytest.approx(lora["heldout_before"], abs=1e-4)
    # Rank 1 on all six projections of 4 blocks of hidden 128 (MLP 512),
    # 4 x (4 x 256 + 2 x 640), and the tied token embedding at rank 4,
    # 4 x (4096 + 128).
    assert lora["trainable_params"] == 9_216 + 16_896
    assert full["trainable_params"] == full["total_params"]
    # keras-hub's enable_lora on the same layers factors q/k/v's
    # (128, heads, head_dim) kernels as
    # (128, heads, 1) x (1, 32) and makes the wrapped layers' biases
    # trainable: 4 x (3 x 544 + 256 + 2 x 640 + 1152 biases).
    assert builtin["trainable_params"] == 17_280
    # The new domain is learned: the held-out evaluation is deterministic
    # (fixed rows, no dropout), so its only step-to-step movement is the
    # model's; LoRA's drop is many times the largest rise between two
    # evaluations, and every evaluation is below the start.
    curve = [loss for _, loss in lora["heldout_curve"]]
    assert len(curve) == 3
    drop = curve[0] - curve[-1]
    wobble = max([b - a for a, b in zip(curve[:-1], curve[1:], strict=True)] + [0.01])
    assert drop > 0.1 and drop > 5 * wobble, curve
    for run in (lora, full):  # The dial, at the default weights.
        sweep = run["weighted_update"]
        assert [p["weight"] for p in sweep] == list(config.update_weights)
        losses = [[p["heldout"], p["original_domain"]] for p in sweep]
        assert np.isfinite(losses).all()
    assert "weighted_update" not in builtin
    dial = result["summary"]["weighted_update"]
    assert set(dial) == {"lora", "full"}
    point = dial["lora"][0]
    gain = lora["heldout_before"] - lora["weighted_update"][0]["heldout"]
    full_gain = full["heldout_before"] - full["heldout_after"]
    assert point["recovery"] == pytest.approx(gain / full_gain)
    assert (tmp_path / "quality_adapter").is_dir()
    with open(tmp_path / "quality_loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = "\n".join(quality_report.markdown(result))
    assert "keras-lora's own small GPT-2" in page
    assert "byte-level BPE" in page
    assert "standard-library docstrings" in page
    assert "standard-library source code" in page
    assert "HF PEFT (torch) skipped: peft not installed" in page
    assert "| keras-hub enable_lora | 0.02 | 17,280" in page
    assert len(result["generations"]["builtin"]) == 1
    assert "| w | keras-lora: recovery, forgetting |" in page
    assert "| 0.5 | " in page


@pytest.mark.worker_backend("torch")
def test_quality_peft_run_loads_the_same_weights(tmp_path):
    pytest.importorskip("peft")
    config = quality.QualityConfig(
        out=str(tmp_path), runs=("peft",), **TINY | {"steps": 8, "eval_every": 4}
    )
    result = quality.quality(config)
    lora, peft = result["runs"]["lora"], result["runs"]["peft"]
    # transformers loaded the Hugging Face export of the shipped base: it
    # scores the held-out rows as the Keras model does.
    assert peft["heldout_before"] == pytest.approx(lora["heldout_before"], abs=1e-3)
    assert peft["original_domain_before"] == pytest.approx(
        lora["original_domain_before"], abs=1e-3
    )
    # GPT-2's fused c_attn is adapted whole at rank 1, 4 x ((128 + 384) +
    # 256 + 2 x 640), plus wte at rank 4 (4 x (4096 + 128)); PEFT's tied
    # lm_head adapter is a second pair of Parameters over wte's factors'
    # storage, and torch counts it again.
    assert peft["trainable_params"] == 8_192 + 2 * 16_896
    assert "wte" in peft["lora"]["targets"] and "lm_head" in peft["lora"]["targets"]
    assert peft["heldout_before"] - peft["heldout_after"] > 0.05
    assert peft["peak_memory_bytes"] > 2**20 and peft["saved_bytes"] > 0
    assert [len(g) > len("def f(self") for g in result["generations"]["peft"]] == [True]
    assert result["generations"]["peft"][0].startswith("def f(self")
