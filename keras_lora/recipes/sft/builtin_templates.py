"""Built-in chat templates for keras-hub presets, one per family.

keras-hub presets carry no chat template, so `keras-lora sft` brings one per
family, in the turn format that family's instruction-tuned models were
trained with (each copies the template of the family's instruct model on
the Hugging Face Hub, text only):

- Llama 3: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n`
  ...`<|eot_id|>` per turn, any roles.
- Mistral: `<s>[INST] user [/INST] answer</s>[INST] ...`; a system message
  goes before the first user message, separated by a blank line.
- Qwen2: ChatML, `<|im_start|>role\\n...<|im_end|>\\n`, with Qwen's default
  system turn when the conversation has none.
- Gemma (1 and 2): `<bos><start_of_turn>user\\n...<end_of_turn>\\n`, the
  assistant as `model`; no system role.
- Gemma 3: the same; a system message is put at the start of the first
  user turn, separated by a blank line.
- GPT-2: no chat format, so no template: plain data (`text`, or string
  prompt-completion) trains as is, and conversational data needs
  `--chat-template FILE`.

Each template names its turn markers: they must be single tokens of the
preset's vocabulary, or the rendered turns would not be what the model
knows.
"""

from __future__ import annotations

import dataclasses

__all__ = ["BuiltinTemplate", "TEMPLATES", "template_for_tokenizer"]


@dataclasses.dataclass(frozen=True)
class BuiltinTemplate:
    """A family's chat template and the turn markers it writes.

    Args:
        family: the family's name, as reports and errors show it.
        source: the Jinja template (rendered by `chat_template.ChatTemplate`).
        markers: tokens the template writes that must each be one token.

    Example:

    >>> TEMPLATES["qwen2"].markers
    ('<|im_start|>', '<|im_end|>')
    """

    family: str
    source: str
    markers: tuple[str, ...]


_ALTERNATE = (
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
)

LLAMA3 = BuiltinTemplate(
    "llama3",
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

MISTRAL = BuiltinTemplate(
    "mistral",
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}{% for message in loop_messages %}"
    + _ALTERNATE
    + "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + "
    "' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}",
    (),
)

QWEN2 = BuiltinTemplate(
    "qwen2",
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    ("<|im_start|>", "<|im_end|>"),
)

_GEMMA_TURNS = (
    "{% for message in loop_messages %}"
    + _ALTERNATE
    + "{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first "
    "else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

GEMMA = BuiltinTemplate(
    "gemma",
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set first_user_prefix = '' %}{% set loop_messages = messages %}"
    "{{ bos_token }}" + _GEMMA_TURNS,
    ("<start_of_turn>", "<end_of_turn>"),
)

GEMMA3 = BuiltinTemplate(
    "gemma3",
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}" + _GEMMA_TURNS,
    ("<start_of_turn>", "<end_of_turn>"),
)

TEMPLATES = {t.family: t for t in (LLAMA3, MISTRAL, QWEN2, GEMMA, GEMMA3)}

# keras-hub tokenizer classes -> their family's template (None: the family
# has no chat format). Looked up along the class's MRO, so subclasses match.
_BY_TOKENIZER = {
    "Llama3Tokenizer": LLAMA3,
    "MistralTokenizer": MISTRAL,
    "QwenTokenizer": QWEN2,
    "GemmaTokenizer": GEMMA,
    "Gemma3Tokenizer": GEMMA3,
    "GPT2Tokenizer": None,
}


def template_for_tokenizer(tokenizer_class: type) -> BuiltinTemplate | None:
    """The built-in template of a keras-hub tokenizer class, or None.

    Args:
        tokenizer_class: e.g. `keras_hub.models.GemmaTokenizer`.

    Returns:
        The family's `BuiltinTemplate`; None for GPT-2 (no chat format) and
        for tokenizers of families without a built-in template.

    Example:

    >>> class QwenTokenizer: pass
    >>> template_for_tokenizer(QwenTokenizer).family
    'qwen2'
    """
    for cls in tokenizer_class.__mro__:
        if cls.__name__ in _BY_TOKENIZER:
            return _BY_TOKENIZER[cls.__name__]
    return None
