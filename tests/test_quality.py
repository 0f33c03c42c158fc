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

from keras_lora.recipes import data, pretrain, quality


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
    rows = data.token_windows(heldout, tokenizer, 33, max_rows=8)
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


def test_quality_part_end_to_end(tmp_path):
    config = quality.QualityConfig(
        out=str(tmp_path),
        steps=16,
        batch=8,
        seq=64,
        eval_every=8,
        eval_rows=8,
        max_length=12,
        prompts=("def f(self",),
        lora_learning_rate=5e-3,
        full_learning_rate=2e-3,
    )
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
    lora, full = result["runs"]["lora"], result["runs"]["full"]
    assert keys <= set(lora) and keys <= set(full)
    # Rank 2 on all six projections of 4 blocks of hidden 128 (MLP 512):
    # 4 x (4 x 512 + 2 x 1280).
    assert lora["trainable_params"] == 18_432
    assert full["trainable_params"] == full["total_params"]
    # Both runs start from the same base.
    assert lora["heldout_before"] == pytest.approx(full["heldout_before"], abs=1e-4)
    # The new domain is learned. The held-out evaluation is deterministic
    # (fixed rows, no dropout), so the drop is the model's, not sampling.
    assert lora["heldout_before"] - lora["heldout_after"] > 0.1
    assert len(lora["heldout_curve"]) == 3
    assert (tmp_path / "quality_adapter").is_dir()
    with open(tmp_path / "quality_loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = "\n".join(quality.markdown(result))
    assert "keras-lora's own small GPT-2" in page
    assert "byte-level BPE" in page
    assert "standard-library docstrings" in page
    assert "standard-library source code" in page
    assert len(result["generations"]["lora"]) == 1
