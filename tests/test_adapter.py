"""Adapter files: exact round trips, resuming, strict and safe failures."""

import json
import math
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import safetensors.numpy

import keras_lora.saving as adapter_module
from keras_lora import (
    inject_lora,
    load_adapter,
    lora_layers,
    read_adapter_config,
    save_adapter,
    trainable_summary,
)
from tests.helpers import (
    constant_token_task,
    count_walks,
    gpt2_base_backbone,
    learnable_lm,
    mlp,
    randomize_lora_b,
    snapshot,
    tiny_gpt2_lm,
    to_numpy,
    token_batch,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compiled(lm, learning_rate=3e-2):
    lm.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lm


def test_round_trip_in_new_process_and_resume(tmp_path):
    lm = learnable_lm()
    lm.backbone.save_to_preset(str(tmp_path / "base"))
    inject_lora(lm, rank=4, alpha=8.0, targets=("query", "value"))
    x, y, w = constant_token_task()
    losses = compiled(lm).fit(x, y, sample_weight=w, epochs=5, verbose=0)
    first_loss = losses.history["loss"][0]
    save_adapter(lm, tmp_path / "adapter")
    end_loss = lm.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)["loss"]
    probe = token_batch(seed=5)
    np.savez(tmp_path / "data.npz", x_ids=x["token_ids"], y=y, probe=probe["token_ids"])
    np.save(tmp_path / "expected.npy", to_numpy(lm(probe)))

    child = textwrap.dedent(
        f"""
        import json, keras, keras_hub, numpy as np
        from keras_lora import load_adapter, trainable_summary
        data = np.load({str(tmp_path / "data.npz")!r})
        lm = keras_hub.models.GPT2CausalLM.from_preset(
            {str(tmp_path / "base")!r}, preprocessor=None)
        load_adapter(lm, {str(tmp_path / "adapter")!r})
        mask = np.ones_like(data["probe"])
        logits = keras.ops.convert_to_numpy(
            lm({{"token_ids": data["probe"], "padding_mask": mask}}))
        np.save({str(tmp_path / "actual.npy")!r}, logits)
        lm.compile(optimizer=keras.optimizers.Adam(3e-2),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = {{"token_ids": data["x_ids"], "padding_mask": np.ones_like(data["x_ids"])}}
        start = lm.evaluate(x, data["y"], verbose=0, return_dict=True)["loss"]
        history = lm.fit(x, data["y"], epochs=3, verbose=0)
        print(json.dumps({{"start": start, "losses": history.history["loss"],
                          "trainable": trainable_summary(lm)["trainable"]}}))
        """
    )
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(
        np.load(tmp_path / "actual.npy"), np.load(tmp_path / "expected.npy")
    )
    assert report["trainable"] == trainable_summary(lm)["trainable"]
    # Training resumes from the saved factors: the loss starts where the
    # first run ended, far below where that run started, and keeps falling.
    assert report["start"] == pytest.approx(end_loss, rel=1e-5)
    assert report["start"] < first_loss - 0.5
    resumed = report["losses"]
    assert resumed[-1] < resumed[0]


def test_gpt2_base_adapter_is_under_one_megabyte(tmp_path):
    backbone = gpt2_base_backbone()
    inject_lora(backbone, rank=4)
    save_adapter(backbone, tmp_path / "adapter")
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    assert 147_456 * 4 < size < 1_000_000
    full_size = trainable_summary(backbone)["total"] * 4
    assert full_size > 490_000_000


def test_config_records_layout(tmp_path):
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2, alpha=4.0, dropout=0.1, targets=("query", "value"))
    save_adapter(lm, tmp_path)
    config = read_adapter_config(tmp_path)
    assert config["format_version"] == 1
    assert config["base_model"]["class"] == "keras_hub.GPT2CausalLM"
    first = config["layers"][0]
    assert first["path"] == "transformer_layer_0/self_attention/query"
    assert (first["rank"], first["alpha"], first["dropout"]) == (2, 4.0, 0.1)
    assert first["lora_a_shape"] == [16, 2] and first["lora_b_shape"] == [2, 2, 8]
    assert first["kernel_shape"] == [16, 2, 8] and first["kernel_dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == [
        "adapter_config.json",
        config["weights_file"],
    ]


def parse_safetensors(data: bytes) -> dict:
    """Parse a safetensors file strictly, by its specification: an 8-byte
    little-endian header length, a JSON header, then tensor data whose
    offsets tile the rest of the file exactly. Returns the header."""
    assert len(data) >= 8
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size].decode("utf-8"))
    body = len(data) - 8 - header_size
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            assert all(isinstance(v, str) for v in entry.values())
            continue
        start, end = entry["data_offsets"]
        assert end - start == sizes[entry["dtype"]] * math.prod(entry["shape"]), name
        spans.append((start, end))
    spans.sort()
    # Offsets cover the data exactly: no gap, no overlap, nothing left over
    # where a pickle (or anything else) could hide.
    assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]]
    assert spans[-1][1] == body
    return header


def test_adapter_files_are_json_and_safetensors_only(tmp_path):
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2, targets=("query", "value"))
    randomize_lora_b(lm)
    save_adapter(lm, tmp_path)
    save_adapter(lm, tmp_path)  # A second save leaves no stray files.
    config = json.loads((tmp_path / "adapter_config.json").read_text("utf-8"))
    weights = config["weights_file"]
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", weights]
    data = (tmp_path / weights).read_bytes()
    header = parse_safetensors(data)
    assert header["__metadata__"] == {"format": "keras_lora.adapter"}
    assert len(header) - 1 == 2 * len(config["layers"]) == 8
    # The header length's low byte comes first, so a valid file may well
    # begin with 0x80 (pickle's PROTO opcode): the old check proved nothing.
    tensors = safetensors.numpy.load(data)
    for layer in lora_layers(lm):
        key = layer.original_layer.kernel.path.rpartition("/")[0]
        np.testing.assert_array_equal(tensors[key + "/lora_b"], to_numpy(layer.lora_b))


def test_parse_safetensors_catches_trailing_bytes():
    """The parser above fails on a file with anything after its tensors."""
    data = safetensors.numpy.save({"a": np.zeros((2, 3), "float32")})
    parse_safetensors(data)
    with pytest.raises(AssertionError):
        parse_safetensors(data + pickle.dumps([1, 2]))


def test_load_replaces_factors_of_injected_model(tmp_path):
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2)
    randomize_lora_b(lm, seed=1)
    save_adapter(lm, tmp_path)
    expected = to_numpy(lm(token_batch()))
    randomize_lora_b(lm, seed=2)
    load_adapter(lm, tmp_path)
    np.testing.assert_array_equal(to_numpy(lm(token_batch())), expected)


def test_layout_mismatch_is_refused(tmp_path):
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2)
    save_adapter(lm, tmp_path)
    other = tiny_gpt2_lm()
    inject_lora(other, rank=2, targets=("query",))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        load_adapter(other, tmp_path)
    other_rank = tiny_gpt2_lm()
    inject_lora(other_rank, rank=4)
    with pytest.raises(ValueError, match="rank, alpha"):
        load_adapter(other_rank, tmp_path)


def rewrite_weights(path, mutate):
    """Rewrite an adapter's tensors consistently (new name and checksum)."""
    config = read_adapter_config(path)
    tensors = safetensors.numpy.load_file(str(path / config["weights_file"]))
    mutate(tensors, config)
    os.remove(path / config["weights_file"])
    data = safetensors.numpy.save(tensors)
    digest = adapter_module.hashlib.sha256(data).hexdigest()
    config["weights_file"] = f"adapter_weights.{digest[:16]}.safetensors"
    config["weights_sha256"] = digest
    (path / config["weights_file"]).write_bytes(data)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _drop_tensor(tensors, config):
    del tensors[next(iter(tensors))]


def _add_tensor(tensors, config):
    tensors["extra/lora_a"] = np.zeros((2, 2), "float32")


def _reshape_tensor(tensors, config):
    key = next(k for k in tensors if k.endswith("lora_b"))
    tensors[key] = np.zeros((2, 16), "float32")


def _truncate(path):
    weights = path / read_adapter_config(path)["weights_file"]
    weights.write_bytes(weights.read_bytes()[:100])


def _flip_byte(path):
    weights = path / read_adapter_config(path)["weights_file"]
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))


def _not_json(path):
    (path / "adapter_config.json").write_text("{not json")


def _not_adapter(path):
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))


def _future_version(path):
    config = read_adapter_config(path)
    config["format_version"] = 99
    (path / "adapter_config.json").write_text(json.dumps(config))


BROKEN = {
    "missing_tensor": (lambda p: rewrite_weights(p, _drop_tensor), "missing"),
    "extra_tensor": (lambda p: rewrite_weights(p, _add_tensor), "unexpected"),
    "wrong_shape": (lambda p: rewrite_weights(p, _reshape_tensor), "shapes"),
    "truncated": (_truncate, "truncated or corrupted"),
    "corrupted": (_flip_byte, "truncated or corrupted"),
    "not_json": (_not_json, "not valid JSON"),
    "not_an_adapter": (_not_adapter, "not a keras-lora adapter"),
    "future_version": (_future_version, "format version 99"),
    "no_config": (lambda p: os.remove(p / "adapter_config.json"), "is missing"),
}


@pytest.mark.parametrize("case", BROKEN)
@pytest.mark.parametrize("already_injected", [False, True], ids=["base", "injected"])
def test_broken_adapter_is_refused_and_model_unchanged(
    tmp_path, case, already_injected
):
    source = tiny_gpt2_lm()
    inject_lora(source, rank=2)
    randomize_lora_b(source)
    save_adapter(source, tmp_path)
    damage, message = BROKEN[case]
    damage(tmp_path)

    target = tiny_gpt2_lm()
    if already_injected:
        inject_lora(target, rank=2)
    before_weights, before_layers = snapshot(target), lora_layers(target)
    with pytest.raises(ValueError, match=message):
        load_adapter(target, tmp_path)
    assert lora_layers(target) == before_layers
    after = snapshot(target)
    assert after.keys() == before_weights.keys()
    for key, value in after.items():
        np.testing.assert_array_equal(value, before_weights[key])


def test_other_base_model_is_refused(tmp_path):
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2)
    save_adapter(lm, tmp_path)
    deeper = tiny_gpt2_lm(num_layers=3)
    with pytest.raises(ValueError, match="different base architecture"):
        load_adapter(deeper, tmp_path)
    assert lora_layers(deeper) == []
    with pytest.raises(ValueError, match="trained on a keras_hub.GPT2CausalLM"):
        load_adapter(mlp(), tmp_path)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoraLayer"):
        save_adapter(mlp(), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    model = mlp()
    inject_lora(model, targets="hidden_1")
    with pytest.raises(ValueError, match="is a file"):
        save_adapter(model, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("fail_at", ["weights_write", "config_rename"])
def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch, fail_at):
    lm = tiny_gpt2_lm()
    inject_lora(lm, rank=2)
    randomize_lora_b(lm, seed=1)
    save_adapter(lm, tmp_path)
    expected = snapshot(lm)
    randomize_lora_b(lm, seed=2)

    real_write = adapter_module.atomic_write
    calls = []

    def interrupted_write(final_path, data):
        calls.append(final_path)
        if fail_at == "weights_write":
            # Dies halfway through writing the new weights.
            with open(final_path + ".partial-crash", "wb") as f:
                f.write(data[: len(data) // 2])
            raise KeyboardInterrupt("simulated crash")
        if final_path.endswith("adapter_config.json"):
            raise KeyboardInterrupt("simulated crash before the config rename")
        real_write(final_path, data)

    monkeypatch.setattr(adapter_module, "atomic_write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(lm, tmp_path)
    monkeypatch.setattr(adapter_module, "atomic_write", real_write)

    fresh = tiny_gpt2_lm()
    load_adapter(fresh, tmp_path)
    for layer in lora_layers(fresh):
        for name in ("lora_a", "lora_b"):
            variable = getattr(layer, name)
            np.testing.assert_array_equal(to_numpy(variable), expected[variable.path])


def test_load_and_save_walk_the_tree_once(tmp_path, monkeypatch):
    source = tiny_gpt2_lm()
    inject_lora(source, rank=2, targets=("query", "value"))
    randomize_lora_b(source)
    walks = count_walks(monkeypatch)
    save_adapter(source, tmp_path)
    assert len(walks) == 1
    # Into a base model: checks, wrapping and freezing share one index
    # (five walks before); into a wrapped model, likewise one.
    base = tiny_gpt2_lm()
    walks.clear()
    load_adapter(base, tmp_path)
    assert len(walks) == 1
    walks.clear()
    load_adapter(base, tmp_path)
    assert len(walks) == 1
    for loaded, saved in zip(lora_layers(base), lora_layers(source), strict=True):
        np.testing.assert_array_equal(to_numpy(loaded.lora_b), to_numpy(saved.lora_b))
