"""[sft] chat templates: found where transformers 5 and older versions save
them, overridden by a file, rendered to the same text as transformers'
`apply_chat_template` (special tokens, `raise_exception`, `tojson`,
`namespace`, loop controls, `{% generation %}`)."""

from __future__ import annotations

import json
import os

import pytest

from keras_lora.recipes.sft.chat_template import ChatTemplate, find_chat_template
from keras_lora.recipes.sft.tokenizer import load_tokenizer
from tests import sft_fixtures as fx

transformers = pytest.importorskip("transformers")

# Exercises what transformers' environment adds to plain Jinja.
FEATURES_TEMPLATE = (
    "{% set ns = namespace(count=0) %}{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% continue %}{% endif %}{% set ns.count = ns.count + 1 %}"
    "{{ ns.count }}|{{ message['role'] }}|{{ message['content'] | tojson }}"
    "{% if message.get('reasoning_content') %}[{{ message['reasoning_content'] }}]"
    "{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}>{{ eos_token }}{% endif %}"
    "{% if messages | length > 4 %}{{ raise_exception('at most 4 messages') }}"
    "{% endif %}"
)
CHATS = [
    [{"role": "user", "content": '<b>hé</b> "quoted"'}],
    [
        {"role": "system", "content": "skip me"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "thinking": "hmm"},
    ],
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return fx.build_model_dir("llama3", str(tmp_path_factory.mktemp("m") / "llama3"))


@pytest.mark.parametrize("family", fx.FAMILIES)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_family_templates_render_as_transformers(family, generation_prompt, tmp_path):
    model_dir = fx.build_model_dir(family, str(tmp_path / family))
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    ours = load_tokenizer(model_dir).template
    for chat in (fx.MESSAGES[1]["messages"], fx.MESSAGES[1]["messages"][:3]):
        expected = hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert ours.render(chat, add_generation_prompt=generation_prompt) == expected


def test_environment_features_render_as_transformers(llama_dir, tmp_path):
    path = tmp_path / "features.jinja"
    path.write_text(FEATURES_TEMPLATE)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(llama_dir)
    ours = load_tokenizer(llama_dir, chat_template=str(path)).template
    for chat in CHATS:
        expected = hf.apply_chat_template(
            chat,
            chat_template=FEATURES_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
        )
        assert ours.render(chat, add_generation_prompt=True) == expected
    assert ours.render(CHATS[0]).startswith('<|begin_of_text|>1|user|"<b>hé</b>')
    assert "[hmm]" in ours.render(CHATS[1])  # `thinking` aliased, as transformers
    with pytest.raises(ValueError, match="the chat template failed: at most 4"):
        ours.render(CHATS[1] * 2)


def test_template_sources_and_precedence(llama_dir, tmp_path):
    jinja = os.path.join(llama_dir, "chat_template.jinja")
    with open(jinja) as f:
        assert find_chat_template(llama_dir) == f.read() == fx.LLAMA3_TEMPLATE
    override = tmp_path / "mine.jinja"
    override.write_text("{{ messages[0]['content'] }}")
    assert (
        find_chat_template(llama_dir, str(override)) == "{{ messages[0]['content'] }}"
    )
    # The older place: "chat_template" in tokenizer_config.json, a string or
    # a list of named templates of which "default" is used.
    old = fx.build_model_dir("qwen2", str(tmp_path / "qwen2"))
    assert find_chat_template(old) == fx.QWEN2_TEMPLATE
    config_path = os.path.join(old, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "default!"},
    ]
    with open(config_path, "w") as f:
        json.dump(config, f)
    assert find_chat_template(old) == "default!"
    with pytest.raises(FileNotFoundError, match="no chat template file"):
        find_chat_template(old, str(tmp_path / "missing.jinja"))


def test_sandbox_and_syntax_errors():
    with pytest.raises(ValueError, match=r"not valid Jinja \(line 1"):
        ChatTemplate("{% for m in messages %}")
    # The sandbox refuses to reach Python internals.
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|access"):
        escape.render([{"role": "user", "content": "x"}])
    with pytest.raises(Exception, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])
