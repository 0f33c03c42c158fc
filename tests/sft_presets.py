"""Tiny keras-hub preset directories for the [sft] preset tests, built
offline with `save_to_preset`:

- "llama3": a `Llama3Tokenizer` from a byte-level BPE trained on
  `sft_fixtures.CORPUS` (its special tokens those of Llama 3), a 2-layer
  `Llama3Backbone`.
- "gemma": a `GemmaTokenizer` from a SentencePiece proto trained on the same
  corpus (`<start_of_turn>` and `<end_of_turn>` user-defined pieces, as in
  Gemma's own proto), a 2-layer `GemmaBackbone`.
"""

from __future__ import annotations

import io
import json

from tests import sft_fixtures as fx

PRESET_FAMILIES = ("llama3", "gemma")
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def bpe_vocabulary(special: list[str]) -> tuple[dict[str, int], list[str]]:
    """(vocabulary, merges) of a byte-level BPE trained on the corpus."""
    model = json.loads(fx._byte_level_bpe(special).to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], merges


def sentencepiece_proto() -> bytes:
    """A Gemma-like SentencePiece proto (identity normalisation, no dummy
    prefix, byte fallback, the turn markers as user-defined pieces)."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(fx.CORPUS),
        model_writer=buffer,
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return buffer.getvalue()


def build_preset(family: str, path: str) -> str:
    """Save a tiny keras-hub causal LM of `family` at `path`; returns it."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    sizes = dict(
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )
    if family == "llama3":
        vocabulary, merges = bpe_vocabulary(LLAMA3_SPECIAL)
        tokenizer = keras_hub.models.Llama3Tokenizer(vocabulary, merges)
        backbone = keras_hub.models.Llama3Backbone(
            vocabulary_size=len(vocabulary), max_sequence_length=256, **sizes
        )
        lm = keras_hub.models.Llama3CausalLM(
            backbone, keras_hub.models.Llama3CausalLMPreprocessor(tokenizer)
        )
    else:
        tokenizer = keras_hub.models.GemmaTokenizer(proto=sentencepiece_proto())
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=tokenizer.vocabulary_size(), head_dim=4, **sizes
        )
        lm = keras_hub.models.GemmaCausalLM(
            backbone, keras_hub.models.GemmaCausalLMPreprocessor(tokenizer)
        )
    lm.save_to_preset(path)
    return path
