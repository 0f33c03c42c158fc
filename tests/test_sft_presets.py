"""[sft] on keras-hub presets: the built-in template of each family renders
its documented turn format exactly; local `save_to_preset` directories of
two families (Llama 3: byte-pair, Gemma: SentencePiece) encode as keras-hub
tokenizes, with the prompt masked, `--inspect` and a tiny training run work
and write the PEFT export; GPT-2 refuses conversational data without
`--chat-template`; a preset name keras-hub cannot fetch gets a clear error."""

from __future__ import annotations

import json
import os

import pytest

from keras_lora.cli import main
from keras_lora.recipes.sft.builtin_templates import TEMPLATES
from keras_lora.recipes.sft.chat_template import ChatTemplate, MissingChatTemplate
from keras_lora.recipes.sft.data import read_examples
from keras_lora.recipes.sft.encode import IGNORE, encode_examples
from keras_lora.recipes.sft.preset_tokenizer import (
    PresetTokenizer,
    is_keras_hub_preset,
)
from keras_lora.recipes.sft.tokenizer import load_tokenizer
from tests import sft_fixtures as fx
from tests import sft_presets as sp

keras_hub = pytest.importorskip("keras_hub")

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
]
# The special tokens keras-hub's tokenizer of each family names.
SPECIAL = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "qwen2": {"eos_token": "<|endoftext|>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    "gemma3": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
}
L3_TURN = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
QWEN_TURN = "<|im_start|>{}\n{}<|im_end|>\n"
GEMMA_TURN = "<start_of_turn>{}\n{}<end_of_turn>\n"
# family -> (whole chat, chat[:3] with the generation prompt, with a system
# message first); None where the family refuses a system message.
EXPECTED = {
    "llama3": (
        "<|begin_of_text|>"
        + L3_TURN.format("user", "Hi there.")
        + L3_TURN.format("assistant", "Hello! How can I help?")
        + L3_TURN.format("user", "What is 2 + 2?")
        + L3_TURN.format("assistant", "4."),
        "<|begin_of_text|>"
        + L3_TURN.format("user", "Hi there.")
        + L3_TURN.format("assistant", "Hello! How can I help?")
        + L3_TURN.format("user", "What is 2 + 2?")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|>"
        + L3_TURN.format("system", "Be brief.")
        + L3_TURN.format("user", "Hi there.")
        + L3_TURN.format("assistant", "Hello! How can I help?")
        + L3_TURN.format("user", "What is 2 + 2?")
        + L3_TURN.format("assistant", "4."),
    ),
    "mistral": (
        "<s>[INST] Hi there. [/INST] Hello! How can I help?</s>"
        "[INST] What is 2 + 2? [/INST] 4.</s>",
        "<s>[INST] Hi there. [/INST] Hello! How can I help?</s>"
        "[INST] What is 2 + 2? [/INST]",
        "<s>[INST] Be brief.\n\nHi there. [/INST] Hello! How can I help?</s>"
        "[INST] What is 2 + 2? [/INST] 4.</s>",
    ),
    "qwen2": (
        QWEN_TURN.format("system", "You are a helpful assistant.")
        + QWEN_TURN.format("user", "Hi there.")
        + QWEN_TURN.format("assistant", "Hello! How can I help?")
        + QWEN_TURN.format("user", "What is 2 + 2?")
        + QWEN_TURN.format("assistant", "4."),
        QWEN_TURN.format("system", "You are a helpful assistant.")
        + QWEN_TURN.format("user", "Hi there.")
        + QWEN_TURN.format("assistant", "Hello! How can I help?")
        + QWEN_TURN.format("user", "What is 2 + 2?")
        + "<|im_start|>assistant\n",
        QWEN_TURN.format("system", "Be brief.")
        + QWEN_TURN.format("user", "Hi there.")
        + QWEN_TURN.format("assistant", "Hello! How can I help?")
        + QWEN_TURN.format("user", "What is 2 + 2?")
        + QWEN_TURN.format("assistant", "4."),
    ),
    "gemma": (
        "<bos>"
        + GEMMA_TURN.format("user", "Hi there.")
        + GEMMA_TURN.format("model", "Hello! How can I help?")
        + GEMMA_TURN.format("user", "What is 2 + 2?")
        + GEMMA_TURN.format("model", "4."),
        "<bos>"
        + GEMMA_TURN.format("user", "Hi there.")
        + GEMMA_TURN.format("model", "Hello! How can I help?")
        + GEMMA_TURN.format("user", "What is 2 + 2?")
        + "<start_of_turn>model\n",
        None,
    ),
    "gemma3": (
        "<bos>"
        + GEMMA_TURN.format("user", "Hi there.")
        + GEMMA_TURN.format("model", "Hello! How can I help?")
        + GEMMA_TURN.format("user", "What is 2 + 2?")
        + GEMMA_TURN.format("model", "4."),
        "<bos>"
        + GEMMA_TURN.format("user", "Hi there.")
        + GEMMA_TURN.format("model", "Hello! How can I help?")
        + GEMMA_TURN.format("user", "What is 2 + 2?")
        + "<start_of_turn>model\n",
        "<bos>"
        + GEMMA_TURN.format("user", "Be brief.\n\nHi there.")
        + GEMMA_TURN.format("model", "Hello! How can I help?")
        + GEMMA_TURN.format("user", "What is 2 + 2?")
        + GEMMA_TURN.format("model", "4."),
    ),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_builtin_template_renders_the_family_turn_format(family):
    template = ChatTemplate(TEMPLATES[family].source, SPECIAL[family])
    whole, prompt, with_system = EXPECTED[family]
    assert template.render(CHAT) == whole
    assert template.render(CHAT[:3], add_generation_prompt=True) == prompt
    if with_system is None:
        with pytest.raises(ValueError, match="System role not supported"):
            template.render([SYSTEM, *CHAT])
    else:
        assert template.render([SYSTEM, *CHAT]) == with_system


@pytest.mark.parametrize("family", ["mistral", "gemma", "gemma3"])
def test_builtin_template_refuses_roles_out_of_turn(family):
    template = ChatTemplate(TEMPLATES[family].source, SPECIAL[family])
    with pytest.raises(ValueError, match="must alternate"):
        template.render([CHAT[0], CHAT[0]])


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {f: sp.build_preset(f, str(root / f)) for f in sp.PRESET_FAMILIES}


# family -> how the built-in template's generation prompt ends
TURN_START = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>model\n",
}
# family -> the end-of-turn text the built-in template writes after an answer
TURN_END = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>\n"}
UNICODE_CHAT = {
    "messages": [
        {"role": "user", "content": "Say it in French."},
        {"role": "assistant", "content": "Café au lait, s'il vous plaît."},
    ]
}


@pytest.mark.parametrize("family", sp.PRESET_FAMILIES)
def test_preset_encodes_as_keras_hub_with_the_prompt_masked(presets, family, tmp_path):
    preset = presets[family]
    assert is_keras_hub_preset(preset)
    tokenizer = load_tokenizer(preset)
    assert isinstance(tokenizer, PresetTokenizer)
    assert tokenizer.template_origin == f"built-in ({family})"
    kt = keras_hub.models.Tokenizer.from_preset(preset)

    # Plain prompt-completion: start token, keras-hub's ids, the end token;
    # the loss on the completion and the end token only.
    path = fx.write_jsonl(str(tmp_path / "plain.jsonl"), fx.PLAIN_PROMPT_COMPLETION)
    encoded = encode_examples(read_examples(path), tokenizer, 256).examples
    for row, example in zip(fx.PLAIN_PROMPT_COMPLETION, encoded, strict=True):
        text_ids = [int(i) for i in kt.tokenize(row["prompt"] + row["completion"])]
        assert example.input_ids == [kt.start_token_id, *text_ids, kt.end_token_id]
        prompt = 1 + len(kt.tokenize(row["prompt"]))
        assert example.labels[:prompt] == [IGNORE] * prompt
        assert example.labels[prompt:] == example.input_ids[prompt:]

    # Conversations: the answers and their end-of-turn markers only, found
    # through the character offsets (non-ASCII text included).
    encoded = []
    for name, rows in (
        ("pc", fx.CONVERSATIONAL_PROMPT_COMPLETION),
        ("chat", [*fx.MESSAGES, UNICODE_CHAT]),
    ):
        path = fx.write_jsonl(str(tmp_path / f"{name}.jsonl"), rows)
        encoded += encode_examples(read_examples(path), tokenizer, 256).examples
    end = TURN_END[family]
    answers = [
        "The capital is Paris." + end,
        "2 + 2 = 4" + end,
        "Waves fold into foam." + end,
        "Hello! How are you?" + end + "3 * 3 = 9." + end,
        "Café au lait, s'il vous plaît." + end,
    ]
    for answer, example in zip(answers, encoded, strict=True):
        labelled = [i for i in example.labels if i != IGNORE]
        assert tokenizer.decode(labelled) == answer
        # The template writes the start token (none is added on top).
        assert example.input_ids[0] == kt.start_token_id != example.input_ids[1]


@pytest.mark.parametrize("family", sp.PRESET_FAMILIES)
def test_sft_on_a_preset_inspects_trains_and_exports(presets, family, tmp_path):
    preset = presets[family]
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES * 2)
    out = str(tmp_path / "out")
    argv = ["sft", "--model", preset, "--data", data, "--out", out]
    assert main([*argv, "--inspect"]) == 0
    with open(os.path.join(out, "data_report.json")) as f:
        assert json.load(f)["chat_template"] == f"built-in ({family})"
    with open(os.path.join(out, "encoded.jsonl")) as f:
        inspected = [json.loads(line) for line in f]
    assert len(inspected) == 4

    settings = ["--steps", "2", "--batch", "2", "--learning-rate", "0.01"]
    settings += ["--generate-prompts", "1", "--generate-tokens", "3"]
    assert main([*argv, *settings]) == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    # One eval prompt, rendered with the built-in template, answered twice.
    (generation,) = report["generations"]
    assert generation["prompt"].endswith(TURN_START[family])
    assert {"before", "after"} <= set(generation)
    assert report["model"] == preset and report["data"]["kept"] == 4
    assert report["family"] == {"llama3": "llama", "gemma": "gemma"}[family]
    assert report["eval_loss_after"] < report["eval_loss_before"]
    with open(os.path.join(out, "peft", "adapter_config.json")) as f:
        config = json.load(f)
    assert config["base_model_name_or_path"] == os.path.abspath(preset)
    assert os.path.getsize(os.path.join(out, "peft", "adapter_model.safetensors"))

    # --chat-template overrides the built-in template.
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    assert main([*argv, "--inspect", "--chat-template", str(template)]) == 0
    with open(os.path.join(out, "data_report.json")) as f:
        assert json.load(f)["chat_template"] == str(template)
    with open(os.path.join(out, "encoded.jsonl")) as f:
        assert json.loads(f.readline()) != inspected[0]


def _gpt2_tokenizer():
    vocabulary, merges = sp.bpe_vocabulary(["<|endoftext|>"])
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)


def test_gpt2_preset_trains_plain_data_and_refuses_chats(tmp_path):
    tokenizer = PresetTokenizer(_gpt2_tokenizer(), source="gpt2_tiny")
    end = tokenizer.token_to_id("<|endoftext|>")
    path = fx.write_jsonl(str(tmp_path / "plain.jsonl"), fx.PLAIN_PROMPT_COMPLETION)
    example = encode_examples(read_examples(path), tokenizer, 256).examples[0]
    # keras-hub's GPT-2 preprocessing: <|endoftext|> starts and ends a text.
    assert example.input_ids[0] == end and example.input_ids[-1] == end
    assert tokenizer.decode([i for i in example.labels if i != IGNORE]) == (
        " Paris.<|endoftext|>"
    )
    path = fx.write_jsonl(str(tmp_path / "chat.jsonl"), fx.MESSAGES)
    with pytest.raises(MissingChatTemplate, match="no chat format.*--chat-template"):
        encode_examples(read_examples(path), tokenizer, 256)
    template = "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    tokenizer = PresetTokenizer(_gpt2_tokenizer(), template, "gpt2_tiny", "t.jinja")
    example = encode_examples(read_examples(path), tokenizer, 256).examples[0]
    assert tokenizer.decode([i for i in example.labels if i != IGNORE]) == (
        "Waves fold into foam.<|endoftext|>"
    )


def test_builtin_template_needs_its_markers_in_the_vocabulary(tmp_path):
    # A Qwen tokenizer whose vocabulary lacks ChatML's <|im_start|>.
    vocabulary, merges = sp.bpe_vocabulary(["<|endoftext|>"])
    qwen = keras_hub.models.QwenTokenizer(vocabulary=vocabulary, merges=merges)
    tokenizer = PresetTokenizer(qwen, source="qwen_tiny")
    path = fx.write_jsonl(str(tmp_path / "chat.jsonl"), fx.MESSAGES)
    with pytest.raises(MissingChatTemplate, match="<|im_start|>.*qwen2"):
        encode_examples(read_examples(path), tokenizer, 256)


def test_a_preset_name_that_needs_a_download_gets_a_clear_error(
    tmp_path, capsys, monkeypatch
):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(keras_hub.models.Tokenizer, "from_preset", offline)
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES)
    out = tmp_path / "out"
    argv = ["sft", "--model", "llama3_8b_en", "--data", data, "--out", str(out)]
    assert main([*argv, "--inspect"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot load the preset llama3_8b_en (ConnectionError" in err
    assert "needs a download" in err and "give a local directory" in err
    assert not out.exists()
    # A path that does not exist is not taken for a preset name.
    assert not is_keras_hub_preset(str(tmp_path / "missing"))


@pytest.mark.parametrize("family", sp.PRESET_FAMILIES)
def test_generate_chat_on_a_preset_answers_as_sft_generates(
    presets, family, tmp_path, capsys
):
    from keras_lora.recipes.saved_adapter import generate_hf
    from keras_lora.recipes.sft.generation import encode_prompt, generate
    from keras_lora.recipes.sft.run import load_causal_lm
    from keras_lora.recipes.sft.tokenizer import load_tokenizer

    preset = presets[family]
    question = "What is the capital of France?"
    answers, labels = generate_hf(preset, [question], chat=True, max_new_tokens=4)
    assert labels == {"model": preset, "chat_template": f"built-in ({family})"}
    # The answer the sft recipe's own generations give for that prompt.
    tokenizer = load_tokenizer(preset)
    encoded = encode_prompt(tokenizer, [{"role": "user", "content": question}])
    assert encoded.text == tokenizer.template.render(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    lm = load_causal_lm(preset)
    lm.compile(sampler="greedy")
    (want,) = generate(lm, tokenizer, [encoded], 4)
    assert answers == [want.text]
    argv = ["generate", "--model", preset, "--chat", question]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"chat template: built-in ({family})" in printed
    assert want.text in printed
