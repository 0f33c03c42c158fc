"""[sft] `keras-lora sft --inspect`: encoded.jsonl and data_report.json,
a printed summary; bad data is one line on stderr, exit 1, nothing
written."""

from __future__ import annotations

import json
import os

import pytest

from keras_lora.cli import main
from keras_lora.recipes.sft.data import read_examples
from keras_lora.recipes.sft.encode import encode_examples
from keras_lora.recipes.sft.tokenizer import load_tokenizer
from tests import sft_fixtures as fx


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return fx.build_model_dir("qwen2", str(tmp_path_factory.mktemp("m") / "qwen2"))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_inspect_writes_encoded_data_and_report(qwen_dir, tmp_path, capsys):
    rows = fx.MESSAGES + fx.MESSAGES
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), rows)
    out = str(tmp_path / "out")
    argv = ["sft", "--model", qwen_dir, "--data", data, "--out", out, "--inspect"]
    assert main([*argv, "--max-length", "80"]) == 0
    assert sorted(os.listdir(out)) == ["data_report.json", "encoded.jsonl"]
    expected = encode_examples(read_examples(data), load_tokenizer(qwen_dir), 80)
    encoded = read_jsonl(os.path.join(out, "encoded.jsonl"))
    assert encoded == [
        {"input_ids": e.input_ids, "labels": e.labels} for e in expected.examples
    ]
    with open(os.path.join(out, "data_report.json")) as f:
        report = json.load(f)
    assert report["shape"] == "messages"
    assert report["chat_template"] == "tokenizer_config.json"
    assert report["examples"] == 4
    assert report["kept"] == len(encoded) == 4
    assert report["tokens"] == sum(len(e["input_ids"]) for e in encoded)
    assert report["label_tokens"] == sum(
        sum(x != -100 for x in e["labels"]) for e in encoded
    )
    # The 4-message conversations (97 tokens) are cut, still kept.
    assert report["truncated"] == 2 and report["dropped"] == 0
    assert sum(report["length_histogram"].values()) == 4
    printed = capsys.readouterr().out
    assert "4 messages examples; kept 4 (truncated to 80 tokens: 2" in printed


def test_csv_columns_and_loss_on_all(qwen_dir, tmp_path):
    path = tmp_path / "e2e.csv"
    path.write_text('mr,ref\n"name[The Mill], eatType[pub]",The Mill is a pub.\n')
    out = str(tmp_path / "out")
    argv = ["sft", "--model", qwen_dir, "--data", str(path), "--out", out]
    columns = ["--prompt-column", "mr", "--completion-column", "ref", "--inspect"]
    assert main([*argv, *columns, "--loss-on", "all"]) == 0
    (example,) = read_jsonl(os.path.join(out, "encoded.jsonl"))
    assert example["labels"] == example["input_ids"]
    assert main([*argv, *columns]) == 0
    (example,) = read_jsonl(os.path.join(out, "encoded.jsonl"))
    tokenizer = load_tokenizer(qwen_dir).tokenizer
    answer = [x for x in example["labels"] if x != -100]
    assert tokenizer.decode(answer, skip_special_tokens=False) == (
        "The Mill is a pub.<|im_end|>"
    )


@pytest.mark.parametrize(
    "content, problem",
    [
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n',
            "line 2: invalid JSON",
        ),
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
            "line 2: missing key",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, '
            '{"role": "robot", "content": "b"}]}\n',
            "line 1: 'messages'[1]: unknown role 'robot'",
        ),
    ],
)
def test_bad_data_one_line_exit_1_nothing_written(
    qwen_dir, tmp_path, capsys, content, problem
):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    out = tmp_path / "out"
    argv = ["sft", "--model", qwen_dir, "--data", str(path), "--out", str(out)]
    assert main([*argv, "--inspect"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"keras-lora: error: train.jsonl {problem}"), err
    assert not out.exists()


def test_missing_template_one_line_exit_1(tmp_path, capsys):
    model = fx.build_model_dir("llama3", str(tmp_path / "llama3"))
    os.remove(os.path.join(model, "chat_template.jinja"))
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES)
    out = tmp_path / "out"
    argv = ["sft", "--model", model, "--data", data, "--out", str(out), "--inspect"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--chat-template FILE" in err
    assert not out.exists()
    template = tmp_path / "t.jinja"
    template.write_text(fx.LLAMA3_TEMPLATE)
    assert main([*argv, "--chat-template", str(template)]) == 0
    with open(out / "data_report.json") as f:
        assert json.load(f)["chat_template"] == str(template)
