"""One entry per model family: how to build a tiny model of it on each side.

Adding a family to the tests is one `FamilyCase` here (plus its data
module in `keras_lora.families`). The transformers side is only named
(class names, config dicts), so importing this module needs no torch.
"""

from __future__ import annotations

import dataclasses

import keras_hub

from keras_lora.families import GEMMA, GEMMA3, GPT2, LLAMA, MISTRAL, QWEN2, Family
from tests.helpers import tiny_gpt2_backbone

VOCAB = 64
# Grouped-query attention: 4 query heads share 2 key/value heads.
_DECODER = dict(
    vocabulary_size=VOCAB,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
)
_HF_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


@dataclasses.dataclass(frozen=True)
class FamilyCase:
    """A family under test.

    Args:
        family: its data.
        backbone: keras-hub backbone class name.
        causal_lm: keras-hub task class name.
        backbone_config: a tiny keras-hub backbone's arguments.
        hf_class: the transformers causal LM class name.
        hf_config: the transformers config class name and its arguments
            (the same tiny model); None: no transformers check here.
        name: the test id, when one family has several cases.
        hf_export: whether keras-hub's exporter writes it faithfully (else
            `export_hf_model` must refuse it).
    """

    family: Family
    backbone: str
    causal_lm: str
    backbone_config: dict
    hf_class: str = ""
    hf_config: tuple[str, dict] | None = None
    name: str = ""
    hf_export: bool = True

    @property
    def id(self) -> str:
        return self.name or self.family.name

    def make_backbone(self):
        if self.family is GPT2:
            return tiny_gpt2_backbone(**self.backbone_config)
        return getattr(keras_hub.models, self.backbone)(**self.backbone_config)

    def make_task(self, backbone):
        cls = getattr(keras_hub.models, self.causal_lm)
        return cls(backbone=backbone, preprocessor=None)


CASES = (
    FamilyCase(GPT2, "GPT2Backbone", "GPT2CausalLM", {}),
    FamilyCase(
        LLAMA,
        "Llama3Backbone",
        "Llama3CausalLM",
        dict(_DECODER, tie_word_embeddings=False),
        "LlamaForCausalLM",
        ("LlamaConfig", _HF_DECODER),
    ),
    FamilyCase(
        MISTRAL,
        "MistralBackbone",
        "MistralCausalLM",
        _DECODER,
        "MistralForCausalLM",
        # keras-hub's converter rounds Mistral's weights to float16; the
        # test models' weights are float16 values, so nothing is lost.
        ("MistralConfig", dict(_HF_DECODER, sliding_window=None)),
    ),
    FamilyCase(
        QWEN2,
        "QwenBackbone",
        "QwenCausalLM",
        dict(_DECODER, tie_word_embeddings=False),
        "Qwen2ForCausalLM",
        ("Qwen2Config", _HF_DECODER),  # With q/k/v biases, as Qwen2 has.
    ),
    FamilyCase(
        GEMMA,
        "GemmaBackbone",
        "GemmaCausalLM",
        dict(_DECODER, head_dim=8),
        "GemmaForCausalLM",
        ("GemmaConfig", dict(_HF_DECODER, head_dim=8, tie_word_embeddings=True)),
    ),
    FamilyCase(
        GEMMA,
        "GemmaBackbone",
        "GemmaCausalLM",
        dict(
            _DECODER,
            head_dim=8,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            final_logit_soft_cap=30.0,
            attention_logit_soft_cap=50.0,
            use_sliding_window_attention=True,
            sliding_window_size=64,
        ),
        "Gemma2ForCausalLM",
        (
            "Gemma2Config",
            dict(
                _HF_DECODER,
                head_dim=8,
                tie_word_embeddings=True,
                query_pre_attn_scalar=8,
                sliding_window=64,
            ),
        ),
        name="gemma2",
        hf_export=False,
    ),
    FamilyCase(
        GEMMA3,
        "Gemma3Backbone",
        "Gemma3CausalLM",
        dict(_DECODER, head_dim=8, image_size=None),
        "Gemma3ForCausalLM",
        # query_pre_attn_scalar = head_dim and a window longer than the
        # test's sequences: what keras-hub's converter maps exactly.
        (
            "Gemma3TextConfig",
            dict(
                _HF_DECODER,
                head_dim=8,
                tie_word_embeddings=True,
                query_pre_attn_scalar=8,
                sliding_window=64,
            ),
        ),
    ),
)
