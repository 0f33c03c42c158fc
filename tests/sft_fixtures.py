"""Tiny Hugging Face model directories for the [sft] tests, built offline.

Three families' tokenizer kinds, each with a chat template in that family's
turn format (assistant turns wrapped in `{% generation %}` so TRL's
`assistant_only_loss` can serve as the oracle for `messages` data):

- "llama3": byte-level BPE, BOS added by the post-processor,
  `<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`, template in
  `chat_template.jinja` (transformers 5).
- "qwen2": byte-level BPE, no BOS, ChatML `<|im_start|>role\\n...<|im_end|>\\n`
  with a default system turn, template in `tokenizer_config.json` (older
  transformers).
- "gemma": SentencePiece-style Unigram with metaspace, BOS from the
  post-processor (`add_bos_token` in the config, which transformers 5
  ignores beside a tokenizer.json),
  `<start_of_turn>user|model\\n...<end_of_turn>\\n`.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, salt wind combs the dunes.",
    "Translate to German: good morning. Guten Morgen.",
    "The Eagle is a coffee shop near Burger King with a high customer rating.",
    "2 + 2 = 4, and 3 * 3 = 9; numbers: 12345 67890.",
    "Hello! How are you today? I am fine, thank you, and you?",
    "name[The Mill], eatType[pub], food[Italian], area[riverside]",
] * 4

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role not in ['user', 'model'] %}"
    "{{ raise_exception('Gemma templates know only user and assistant roles') }}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'model' %}{% generation %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
    "{% endif %}"
)

FAMILIES = ("llama3", "qwen2", "gemma")


def build_model_dir(family: str, path: str) -> str:
    """Write a tiny tokenizer directory of `family` at `path`; returns it."""
    os.makedirs(path, exist_ok=True)
    builder = {"llama3": _llama3, "qwen2": _qwen2, "gemma": _gemma}[family]
    tokenizer, config, template_file = builder()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if template_file is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(template_file)
    return path


def _byte_level_bpe(special: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _llama3():
    bos, eos = "<|begin_of_text|>", "<|eot_id|>"
    special = [bos, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", eos]
    tokenizer = _byte_level_bpe(special)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, tokenizer.token_to_id(bos))],
            ),
        ]
    )
    config = {"bos_token": bos, "eos_token": eos, "pad_token": "<|end_of_text|>"}
    return tokenizer, config, LLAMA3_TEMPLATE


def _qwen2():
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = _byte_level_bpe(special)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": QWEN2_TEMPLATE,
    }
    return tokenizer, config, None


def _gemma():
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁")
    tokenizer.decoder = decoders.Metaspace(replacement="▁")
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=special, unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A <bos> $B",
        special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))],
    )
    config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    return tokenizer, config, GEMMA_TEMPLATE


# Data in each shape, with text that crosses turn boundaries in interesting
# ways (leading spaces, trailing whitespace the templates trim, digits).
PLAIN_PROMPT_COMPLETION = [
    {"prompt": "What is the capital of France?", "completion": " Paris."},
    {"prompt": "Translate to German: good morning.", "completion": "Guten Morgen."},
    {"prompt": "name[The Mill], eatType[pub]", "completion": " The Mill is a pub."},
]
CONVERSATIONAL_PROMPT_COMPLETION = [
    {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "completion": [{"role": "assistant", "content": "The capital is Paris."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hello! How are you today?"},
            {"role": "assistant", "content": "I am fine, thank you."},
            {"role": "user", "content": "2 + 2 = ?"},
        ],
        "completion": [{"role": "assistant", "content": "2 + 2 = 4 "}],
    },
]
MESSAGES = [
    {
        "messages": [
            {"role": "user", "content": "Write a haiku about the sea."},
            {"role": "assistant", "content": "Waves fold into foam."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hello! How are you?"},
            {"role": "user", "content": "Fine. What is 3 * 3?"},
            {"role": "assistant", "content": "3 * 3 = 9."},
        ]
    },
]
TEXT = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Hello!"}]


def write_jsonl(path: str, rows: list) -> str:
    """Write rows as JSONL; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def save_tiny_llama(model_dir: str) -> str:
    """Add random tiny Llama weights (transformers, saved offline) to a
    tokenizer directory of `build_model_dir`, sized to its vocabulary."""
    return _save_tiny_weights(model_dir, "LlamaForCausalLM", "LlamaConfig")


def save_tiny_gemma(model_dir: str) -> str:
    """Add random tiny Gemma weights (tied head, head_dim 8) to a tokenizer
    directory of `build_model_dir`, sized to its vocabulary."""
    return _save_tiny_weights(model_dir, "GemmaForCausalLM", "GemmaConfig", head_dim=8)


def _save_tiny_weights(model_dir: str, model: str, config: str, **extra) -> str:
    import torch
    import transformers

    vocab = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    settings = dict(
        vocab_size=vocab.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=config == "GemmaConfig",
    )
    torch.manual_seed(0)
    hf_config = getattr(transformers, config)(**settings, **extra)
    getattr(transformers, model)(hf_config).save_pretrained(model_dir)
    return model_dir


def save_tiny_qwen2(model_dir: str) -> str:
    """Add random tiny Qwen2 weights to a tokenizer directory of
    `build_model_dir`, sized to its vocabulary."""
    return _save_tiny_weights(model_dir, "Qwen2ForCausalLM", "Qwen2Config")


def save_tiny_gpt2(model_dir: str) -> str:
    """Add random tiny GPT-2 weights (transformers; the output head tied to
    the token embedding) to a tokenizer directory of `build_model_dir`."""
    import torch
    import transformers

    vocab = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    config = transformers.GPT2Config(
        vocab_size=vocab.get_vocab_size(),
        n_positions=256,
        n_embd=16,
        n_layer=2,
        n_head=4,
        bos_token_id=vocab.token_to_id("<|begin_of_text|>"),
        eos_token_id=vocab.token_to_id("<|eot_id|>"),
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    return model_dir


def hf_eval_loss(model, encoded: list[dict]) -> float:
    """Token-weighted mean cross-entropy over label positions, by
    transformers' own `labels` loss (per example, weighted by its count)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for example in encoded:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count
