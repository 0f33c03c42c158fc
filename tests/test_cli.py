"""End-to-end tests of the `keras-lora` command (`keras_lora.cli`).

Everything runs offline on a tiny random GPT-2 (2 layers, hidden 64) with a
byte-level BPE tokenizer trained on a slice of the default corpus (Python
standard-library docstrings), for 2 steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

from keras_lora import cli, load_adapter
from keras_lora.recipes import data, tokenization
from keras_lora.recipes import demo as demo_lib
from tests.helpers import DEMO_BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's C++ runtime logs to stderr before Python can stop it; those
# lines are not ours.
NATIVE_LOG = re.compile(
    r"^([IWEF]\d{4} |WARNING: All log messages before absl|To enable the "
    r"following instructions)"
)
TINY = [
    "--arch", "tiny", "--steps", "2", "--batch", "2", "--seq", "16",
    "--max-documents", "40", "--vocab-size", "300", "--max-length", "10",
]  # fmt: skip


def run_main(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny fine-tuning run shared by the tests: (out dir, stdout)."""
    out = str(tmp_path_factory.mktemp("finetune"))
    code, stdout = run_main(["finetune", *TINY, "--out", out])
    assert code == 0, stdout
    return out, stdout


def logits(lm, token_ids) -> np.ndarray:
    x = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return keras.ops.convert_to_numpy(lm(x))


def token_ids(lm) -> np.ndarray:
    return np.array([[5, 17, 42, 99, 7, 3]], dtype="int32") % (
        lm.backbone.vocabulary_size
    )


# ------------------------------------------------------------------ commands


def test_finetune_writes_adapter_base_and_report(run):
    out, stdout = run
    with open(os.path.join(out, "run_report.json")) as f:
        report = json.load(f)
    assert report["weights"].startswith("RANDOM weights, GPT-2 tiny architecture")
    assert "standard-library docstrings" in report["data"]
    assert report["tokenizer"].startswith("byte-level BPE trained on the corpus")
    assert report["backend"] == keras.backend.backend()
    # 2 blocks x (query, value) x (A 64x4 + B 4x(2x32)).
    assert report["parameters"]["trainable"] == 2048
    assert len(report["loss_per_step"]) == 2
    assert all(np.isfinite(report["loss_per_step"]))
    assert report["loss_per_step"][0] == report["loss_per_step_running_mean"][0]
    assert len(report["generations_after"]) == 2
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    assert os.path.isfile(os.path.join(out, "base_preset", "config.json"))
    assert "trainable params: 2,048" in stdout
    assert "before fine-tuning" in stdout and "after fine-tuning" in stdout
    assert "2/2" in stdout  # Keras progress bar.


def test_generate_with_and_without_adapter(run):
    out, _ = run
    base = os.path.join(out, "base_preset")
    args = ["generate", "--preset", base, "--prompt", "The module", "--seq", "16"]
    code, stdout = run_main(args + ["--adapter", os.path.join(out, "adapter")])
    assert code == 0
    assert "local Keras preset" in stdout
    # Generated text may hold newlines: look after the header lines.
    assert stdout.split("adapter: ", 1)[1].splitlines()[1].startswith("The module")
    code, stdout = run_main(args + ["--max-length", "8"])
    assert code == 0 and "adapter: none" in stdout


def test_merge_writes_a_preset_equal_to_base_plus_adapter(run, tmp_path):
    out, _ = run
    base, adapter = os.path.join(out, "base_preset"), os.path.join(out, "adapter")
    merged = str(tmp_path / "merged")
    code, stdout = run_main(
        ["merge", "--preset", base, "--adapter", adapter, "--out", merged]
    )
    assert code == 0 and "merged 4 LoRA layers" in stdout
    merged_lm = keras_hub.models.GPT2CausalLM.from_preset(merged)
    lora_lm = keras_hub.models.GPT2CausalLM.from_preset(base)
    load_adapter(lora_lm, adapter)
    ids = token_ids(lora_lm)
    np.testing.assert_allclose(
        logits(merged_lm, ids), logits(lora_lm, ids), atol=1e-4, rtol=1e-4
    )


def test_merge_to_a_hugging_face_directory_gives_the_same_logits(run, tmp_path):
    import torch
    import transformers

    out, _ = run
    base, adapter = os.path.join(out, "base_preset"), os.path.join(out, "adapter")
    merged = str(tmp_path / "hf")
    code, stdout = run_main(
        ["merge", "--preset", base, "--adapter", adapter, "--out", merged]
        + ["--format", "hf"]
    )
    assert code == 0 and "AutoModelForCausalLM" in stdout
    hf_lm = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    lora_lm = keras_hub.models.GPT2CausalLM.from_preset(base)
    load_adapter(lora_lm, adapter)
    ids = token_ids(lora_lm)
    with torch.no_grad():
        hf_logits = hf_lm(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(hf_logits, logits(lora_lm, ids), atol=1e-4, rtol=1e-4)
    # The adapter is in there: the base alone gives other logits.
    base_lm = keras_hub.models.GPT2CausalLM.from_preset(base)
    assert np.abs(hf_logits - logits(base_lm, ids)).max() > 1e-3


def test_export_then_import_peft_keeps_the_model(run, tmp_path):
    out, _ = run
    base, adapter = os.path.join(out, "base_preset"), os.path.join(out, "adapter")
    peft_dir, back = str(tmp_path / "peft"), str(tmp_path / "back")
    code, _ = run_main(
        ["export-peft", "--preset", base, "--adapter", adapter, "--out", peft_dir]
    )
    assert code == 0
    assert os.path.isfile(os.path.join(peft_dir, "adapter_model.safetensors"))
    code, stdout = run_main(
        ["import-peft", "--preset", base, "--peft", peft_dir, "--out", back]
    )
    assert code == 0 and "wrote adapter" in stdout
    original = keras_hub.models.GPT2CausalLM.from_preset(base)
    load_adapter(original, adapter)
    imported = keras_hub.models.GPT2CausalLM.from_preset(base)
    load_adapter(imported, back)
    ids = token_ids(original)
    np.testing.assert_allclose(
        logits(imported, ids), logits(original, ids), atol=1e-4, rtol=1e-4
    )


def test_finetune_a_local_hugging_face_gpt2_for_one_epoch(tmp_path):
    """A transformers GPT-2 directory with its own vocab.json / merges.txt."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer

    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "run")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        data.default_corpus(max_documents=40),
        vocab_size=300,
        special_tokens=[tokenization.END_OF_TEXT],
        show_progress=False,
    )
    os.makedirs(hf_dir)
    bpe.save_model(hf_dir)
    config = transformers.GPT2Config(
        vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
        n_head=2, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    argv = ["--preset", hf_dir, "--seq", "16", "--max-length", "8"]
    code, stdout = run_main(
        ["finetune", *argv, "--epochs", "1", "--max-documents", "4", "--batch", "2"]
        + ["--out", out]
    )
    assert code == 0, stdout
    with open(os.path.join(out, "run_report.json")) as f:
        report = json.load(f)
    assert report["weights"].startswith("local Hugging Face GPT-2")
    assert report["tokenizer"].startswith("the preset's tokenizer")
    assert report["steps"] is None and len(report["loss_per_step_running_mean"]) == 2
    assert not os.path.exists(os.path.join(out, "base_preset"))
    adapter = os.path.join(out, "adapter")
    code, stdout = run_main(["generate", *argv, "--adapter", adapter, "--prompt", "A"])
    assert code == 0 and "local Hugging Face GPT-2" in stdout


@pytest.mark.skipif(
    keras.backend.backend() == DEMO_BACKEND,
    reason=f"tests/test_install.py runs the demo under {DEMO_BACKEND}",
)
def test_demo_cost_table_and_report(tmp_path):
    out = str(tmp_path / "demo")
    argv = [
        "demo", "--arch", "tiny", "--compare-steps", "1", "--warmup", "1",
        "--eval-batches", "1", "--inference-runs", "1", "--batch", "2", "--seq",
        "16", "--runs", "full", "lora", "--out", out, "--no-quality",
    ]  # fmt: skip
    code, stdout = run_main(argv)
    assert code == 0, stdout
    # No random-weight fine-tune stage any more: the quality part (skipped
    # here, tests/test_quality.py) replaced it.
    assert not os.path.exists(os.path.join(out, "run_report.json"))
    # The cost table ran on code tokens of the shipped tokenizer, folded into
    # the tiny architecture's 1024 ids, with a held-out loss.
    with open(os.path.join(out, "compare", "results.json")) as f:
        compare = json.load(f)
    assert compare["config"]["backends"] == [keras.backend.backend()]
    assert compare["config"]["data"].startswith("token ids from")
    assert compare["config"]["inference_runs"] == 1
    rows = np.load(os.path.join(out, "compare", "tokens.npy"))
    assert rows.shape == (6, 17) and rows.max() < 1024  # (1 + 1 + 1) x 2 rows.
    results = {r["run"]: r for r in compare["results"]}
    assert [results[r]["status"] for r in ("full", "lora")] == ["ok", "ok"]
    assert results["lora"]["trainable_params"] == 2048
    # Benchmark tiny GPT-2: embeddings (1024 + 256) x 64, two blocks of
    # 33,472 (norms, q/k/v, output, 64->128->64 MLP), final norm 128.
    assert results["full"]["trainable_params"] == 1280 * 64 + 2 * 33_472 + 128
    for result in results.values():
        assert 0 < result["eval_loss"] < 10
    assert os.path.getsize(os.path.join(out, "compare", "peak_memory.png")) > 0
    # One page, and the table printed.
    with open(os.path.join(out, "report.md")) as f:
        page = f.read()
    assert f"| {keras.backend.backend()} | keras-lora |" in page
    assert "| full fine-tuning |" in page and "RANDOM weights" in page
    assert "## Quality" not in page
    assert "| held-out loss |" in stdout and "demo finished in" in stdout


def test_demo_needs_enough_corpus_for_the_comparison(run):
    out, _ = run
    config = demo_lib.DemoConfig(out=out, arch="tiny")
    path = os.path.join(out, "tokens.npy")
    with pytest.raises(ValueError, match="the comparison needs 1000000"):
        demo_lib.write_tokens(config, path, needed_rows=10**6)
    assert not os.path.exists(path)


# ------------------------------------------------------------------ errors


def expect_one_line(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("keras-lora") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bogus"], "invalid choice: 'bogus'"),
        ([], "required: COMMAND"),
        (["finetune", "--arch", "tiny", "--rank", "0", "--out", "x"], "--rank"),
        (["finetune", "--arch", "tiny", "--alpha", "-1", "--out", "x"], "--alpha"),
        (["finetune", "--arch", "huge", "--out", "x"], "--arch"),
        (["finetune", "--arch", "tiny"], "--out"),
        (["generate", "--preset", "p"], "--prompt"),
        (["demo", "--compare-steps", "0"], "--compare-steps"),
        (["demo", "--runs", "full", "qlora"], "--runs"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    expect_one_line(capsys, fragment)


def test_missing_files_exit_1_with_one_line(capsys, run, tmp_path, monkeypatch):
    out, _ = run
    base = os.path.join(out, "base_preset")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # Relative --out paths land here, not in the repo.
    missing = str(tmp_path / "missing")
    cases = [
        (["generate", "--preset", missing, "--prompt", "x"], "missing"),
        (
            ["merge", "--preset", base, "--adapter", missing, "--out", "m"],
            f"adapter directory '{missing}' does not exist",
        ),
        (
            ["finetune", "--arch", "tiny", "--data", missing + ".txt", "--out", "o"],
            "no such file or folder",
        ),
        (
            ["import-peft", "--preset", base, "--peft", missing, "--out", "o"],
            f"PEFT adapter directory '{missing}' does not exist",
        ),
        (
            [
                "finetune",
                "--arch",
                "tiny",
                "--data",
                "reddit_tifu",
                "--data-dir",
                str(tmp_path),
                "--out",
                "o",
            ],
            "reddit_tifu is unavailable",
        ),  # fmt: skip
        (["generate", "--preset", str(tmp_path), "--prompt", "x"], "config.json"),
        # A directory that is not an adapter: the library's own error.
        (
            ["generate", "--preset", base, "--adapter", base, "--prompt", "x"],
            "is not a keras-lora adapter",
        ),
        (["compare", "--tiny", "--tokens", missing + ".npy"], "cannot read a .npy"),
        (["compare", "--render", missing + ".json"], "missing.json"),
    ]
    for argv, fragment in cases:
        assert cli.main(argv) == 1, argv
        expect_one_line(capsys, fragment)
    assert os.listdir(work) == []  # Nothing written on failure.
    # Unknown targets fail before anything is written.
    argv = ["finetune", *TINY, "--targets", "nope", "--out", "bad"]
    assert cli.main(argv) == 1
    expect_one_line(capsys, "No layer matched")
    assert not os.path.exists(work / "bad" / "base_preset")


def test_compare_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--backend", "--runs", "--tokens", "--eval-batches", "--render"):
        assert option in help_text


def test_module_entry_point_exit_codes():
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    missing = ["merge", "--preset", "/no/where", "--adapter", "a", "--out", "o"]
    for argv, code in ((["bogus"], 2), (missing, 1)):
        proc = subprocess.run(
            [sys.executable, "-m", "keras_lora.cli", *argv],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == code, proc.stderr
        ours = [line for line in proc.stderr.splitlines() if not NATIVE_LOG.match(line)]
        assert len(ours) == 1 and ours[0].startswith("keras-lora"), proc.stderr
        assert "Traceback" not in proc.stderr
