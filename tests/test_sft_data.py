"""[sft] data: the three TRL shapes from JSONL, a JSON list and CSV/TSV;
every kind of bad data is one line naming the file, the line and the
problem."""

from __future__ import annotations

import json
import re

import pytest

from keras_lora.recipes.sft.data import Columns, DataError, read_examples

GOOD = '{"prompt": "a", "completion": "b"}'


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_shapes(tmp_path):
    text = read_examples(
        write(tmp_path, "t.jsonl", '{"text": "hi"}\n\n{"text": "yo"}\n')
    )
    assert [(e.line, e.text, e.shape) for e in text] == [
        (1, "hi", "text"),
        (3, "yo", "text"),
    ]
    pc = read_examples(write(tmp_path, "p.jsonl", GOOD + "\n"))
    assert (pc[0].prompt, pc[0].completion, pc[0].conversational) == ("a", "b", False)
    conv = {
        "prompt": [{"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a", "tool_calls": None}],
    }
    (example,) = read_examples(write(tmp_path, "c.jsonl", json.dumps(conv)))
    assert example.conversational and example.shape == "prompt-completion"
    # None-valued keys are dropped, as transformers does before rendering.
    assert example.completion == [{"role": "assistant", "content": "a"}]
    messages = {"messages": conv["prompt"] + conv["completion"]}
    (example,) = read_examples(write(tmp_path, "m.jsonl", json.dumps(messages)))
    assert example.shape == "messages" and len(example.messages) == 2


def test_json_list_keeps_line_numbers(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}, {"text": ""}]
    path = write(tmp_path, "l.json", json.dumps(rows, indent=2))
    with pytest.raises(DataError, match=r"^l\.json line 8: 'text' is empty content$"):
        read_examples(path)
    examples = read_examples(write(tmp_path, "ok.json", json.dumps(rows[:2], indent=2)))
    assert [(e.line, e.text) for e in examples] == [(2, "one"), (5, "two")]
    with pytest.raises(DataError, match=r"^bad\.json line 2: invalid JSON"):
        read_examples(write(tmp_path, "bad.json", '[{"text": "a"},\n {"text": }]'))


def test_csv_and_tsv_columns(tmp_path):
    path = write(tmp_path, "e2e.csv", 'mr,ref\n"name[A], food[B]",A serves B.\n')
    (example,) = read_examples(path, Columns(prompt="mr", completion="ref"))
    assert (example.line, example.prompt, example.completion) == (
        2,
        "name[A], food[B]",
        "A serves B.",
    )
    path = write(tmp_path, "t.tsv", "id\tbody\n1\thello world\n")
    (example,) = read_examples(path, Columns(text="body"))
    assert example.text == "hello world"
    (example,) = read_examples(write(tmp_path, "d.csv", "prompt,completion\nq,a\n"))
    assert (example.prompt, example.completion) == ("q", "a")
    with pytest.raises(
        DataError, match=r"^e2e\.csv line 1: no column 'prompt' \(columns: mr, ref\)"
    ):
        read_examples(write(tmp_path, "e2e.csv", "mr,ref\nx,y\n"))
    with pytest.raises(
        DataError, match=r"^e\.csv line 3: 'completion' is empty content$"
    ):
        read_examples(write(tmp_path, "e.csv", "prompt,completion\nq,a\nq2,\n"))
    with pytest.raises(DataError, match=r"^w\.csv line 2: 3 cells, the header has 2$"):
        read_examples(write(tmp_path, "w.csv", "prompt,completion\nq,a,extra\n"))


MESSAGE = {"role": "user", "content": "q"}
ANSWER = {"role": "assistant", "content": "a"}
BAD = [
    ('{"text": "a"', r"invalid JSON \(Expecting ',' delimiter at column 13\)"),
    ('["text"]', r"wrong type: an example is a JSON object, got list"),
    (
        '{"txt": "a"}',
        r"missing key: expected 'text', 'prompt' and 'completion', or 'messages' "
        r"\(keys: 'txt'\)",
    ),
    ('{"prompt": "a"}', r"missing key 'completion'"),
    (
        '{"prompt": "a", "completion": 3}',
        r"wrong type: 'prompt' and 'completion' must both be strings or both be "
        r"lists of messages, got string and number",
    ),
    ('{"text": ["a"]}', r"'text' has the wrong type: list, not a string"),
    ('{"text": "  "}', r"'text' is empty content"),
    (
        json.dumps({"messages": [MESSAGE, {"role": "bot", "content": "a"}]}),
        r"'messages'\[1\]: unknown role 'bot' "
        r"\(known: system, developer, user, assistant, tool\)",
    ),
    (
        json.dumps({"messages": [MESSAGE, {"role": "assistant"}]}),
        r"'messages'\[1\]: missing key 'content'",
    ),
    (
        json.dumps({"messages": [MESSAGE, {"role": "assistant", "content": ""}]}),
        r"'messages'\[1\]: 'content' is empty content",
    ),
    (
        json.dumps(
            {
                "messages": [
                    MESSAGE,
                    {"role": "assistant", "content": [{"type": "text"}]},
                ]
            }
        ),
        r"'messages'\[1\]: 'content' has the wrong type: list, not a string",
    ),
    (
        json.dumps({"messages": [MESSAGE]}),
        r"'messages' has no assistant message to learn",
    ),
    (
        json.dumps({"messages": "hi"}),
        r"'messages' has the wrong type: string, not a list of messages",
    ),
    (
        json.dumps({"prompt": [MESSAGE], "completion": []}),
        r"'completion' is an empty list of messages",
    ),
    (
        json.dumps({"messages": [MESSAGE, ANSWER]}),
        r"a messages example in a file of plain prompt-completion examples; "
        r"one file holds one shape",
    ),
]


@pytest.mark.parametrize("line, problem", BAD, ids=[p[:30] for _, p in BAD])
def test_bad_data_is_one_line_with_file_and_line(tmp_path, line, problem):
    path = write(
        tmp_path, "train.jsonl", GOOD + "\n" + GOOD + "\n" + line + "\n" + GOOD + "\n"
    )
    with pytest.raises(DataError) as caught:
        read_examples(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("train.jsonl line 3: "), message
    assert re.search(problem, message), message


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"^e\.jsonl: no examples$"):
        read_examples(write(tmp_path, "e.jsonl", "\n\n"))
    with pytest.raises(FileNotFoundError, match="no data file"):
        read_examples(str(tmp_path / "missing.jsonl"))
