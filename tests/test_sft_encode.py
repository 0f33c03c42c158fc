"""[sft] encoding: keras-lora's input_ids and labels equal what TRL's
SFTTrainer tokenizes, on tiny offline tokenizers of three families.

TRL (1.16) is the oracle: an `SFTTrainer` over a 1-layer torch Llama,
given transformers' `PreTrainedTokenizerFast` loaded from the same
directory, prepares the same rows; its `train_dataset` holds `input_ids`
and `labels`. For `messages` the templates wrap assistant turns in
`{% generation %}`, so TRL's `assistant_only_loss=True` gives the labels
keras-lora finds by rendering prefixes (no markers needed there).
"""

from __future__ import annotations

import os

import pytest

from keras_lora.recipes.sft.data import read_examples
from keras_lora.recipes.sft.encode import IGNORE, encode_examples
from keras_lora.recipes.sft.tokenizer import load_tokenizer
from tests import sft_fixtures as fx

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

SHAPES = {
    "plain": (fx.PLAIN_PROMPT_COMPLETION, False),
    "conversational": (fx.CONVERSATIONAL_PROMPT_COMPLETION, False),
    "messages": (fx.MESSAGES, True),
    "text": (fx.TEXT, False),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_models")
    return {f: fx.build_model_dir(f, str(root / f)) for f in fx.FAMILIES}


@pytest.fixture(scope="module")
def trl_oracle(tmp_path_factory):
    """rows, family dir, max_length, assistant_only -> (input_ids, labels)."""
    datasets.disable_progress_bars()
    out = str(tmp_path_factory.mktemp("trl_out"))
    models = {}

    def prepare(model_dir, rows, max_length=1024, assistant_only=False):
        hf = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
        if model_dir not in models:
            config = transformers.LlamaConfig(
                vocab_size=len(hf),
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=1,
                num_key_value_heads=1,
            )
            models[model_dir] = transformers.LlamaForCausalLM(config)
        trainer = trl.SFTTrainer(
            model=models[model_dir],
            args=trl.SFTConfig(
                output_dir=out,
                max_length=max_length,
                assistant_only_loss=assistant_only,
                report_to=[],
                use_cpu=True,
            ),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=hf,
        )
        prepared = trainer.train_dataset
        return prepared["input_ids"], prepared["labels"]

    return prepare


def encode(model_dir, rows, tmp_path, **kwargs):
    path = fx.write_jsonl(str(tmp_path / "data.jsonl"), rows)
    return encode_examples(read_examples(path), load_tokenizer(model_dir), **kwargs)


@pytest.mark.parametrize("family", fx.FAMILIES)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_ids_and_labels_equal_trl(family, shape, model_dirs, trl_oracle, tmp_path):
    rows, assistant_only = SHAPES[shape]
    ids, labels = trl_oracle(model_dirs[family], rows, assistant_only=assistant_only)
    data = encode(model_dirs[family], rows, tmp_path)
    assert [e.input_ids for e in data.examples] == ids
    assert [e.labels for e in data.examples] == labels
    # The comparison is not vacuous: answers are labelled, prompts are not.
    assert all(any(x != IGNORE for x in row) for row in labels)
    if shape != "text":
        assert all(row[0] == IGNORE for row in labels)


@pytest.mark.parametrize("family", fx.FAMILIES)
def test_truncation_and_dropping_equal_trl(family, model_dirs, trl_oracle, tmp_path):
    rows = fx.CONVERSATIONAL_PROMPT_COMPLETION
    lengths = [
        len(e.input_ids) for e in encode(model_dirs[family], rows, tmp_path).examples
    ]
    # Cuts the first example inside its answer and the second inside its
    # (longer) prompt, so one is truncated and the other dropped.
    first = encode(model_dirs[family], rows, tmp_path).examples[0]
    first_answer = next(i for i, x in enumerate(first.labels) if x != IGNORE)
    max_length = first_answer + 2
    assert max_length < min(lengths)
    ids, labels = trl_oracle(model_dirs[family], rows, max_length=max_length)
    data = encode(model_dirs[family], rows, tmp_path, max_length=max_length)
    assert [e.input_ids for e in data.examples] == ids
    assert [e.labels for e in data.examples] == labels
    report = data.report()
    assert (report["examples"], report["kept"]) == (2, 1)
    assert (report["truncated"], report["dropped"]) == (1, 1)
    assert report["tokens"] == max_length
    assert report["label_tokens"] == 2


def test_messages_label_exactly_the_assistant_turns(model_dirs, tmp_path):
    model_dir = model_dirs["qwen2"]
    tokenizer = load_tokenizer(model_dir)
    data = encode(model_dir, fx.MESSAGES[1:], tmp_path)
    (example,) = data.examples
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    decoded = [tokenizer.tokenizer.decode(r, skip_special_tokens=False) for r in runs]
    assert decoded == ["Hello! How are you?<|im_end|>\n", "3 * 3 = 9.<|im_end|>\n"]


def test_loss_on_all_labels_every_token(model_dirs, tmp_path):
    for rows, _ in SHAPES.values():
        data = encode(model_dirs["llama3"], rows, tmp_path, loss_on="all")
        for example in data.examples:
            assert example.labels == example.input_ids


def test_no_template_says_how_to_give_one(model_dirs, tmp_path):
    model_dir = str(tmp_path / "bare")
    fx.build_model_dir("llama3", model_dir)
    os.remove(os.path.join(model_dir, "chat_template.jinja"))
    # Plain data needs no template.
    assert len(encode(model_dir, fx.PLAIN_PROMPT_COMPLETION, tmp_path).examples) == 3
    with pytest.raises(ValueError, match="no chat template.*--chat-template FILE"):
        encode(model_dir, fx.MESSAGES, tmp_path)


def test_template_exception_names_the_line(model_dirs, tmp_path):
    rows = [
        fx.MESSAGES[0],
        {
            "messages": [{"role": "system", "content": "Be brief."}]
            + fx.MESSAGES[0]["messages"]
        },
    ]
    with pytest.raises(
        ValueError, match=r"data\.jsonl line 2: .*only user and assistant"
    ):
        encode(model_dirs["gemma"], rows, tmp_path, source="data.jsonl")
