"""Tiny random transformers models on disk (GPT-2, and any family's:
`save_tiny_model`, `Side`), and logits from both sides.

Imports torch, transformers and peft: import this module only after
`pytest.importorskip("torch")`.
"""

from __future__ import annotations

import json
import os

import keras
import keras_hub
import numpy as np
import torch
import transformers

from tests.family_cases import VOCAB

HF_CONFIG = dict(
    vocab_size=96,
    n_positions=32,
    n_embd=16,
    n_layer=2,
    n_head=2,
    bos_token_id=0,
    eos_token_id=0,
)


def save_hf_gpt2(path, seed=0) -> str:
    """Save a random `GPT2LMHeadModel` with `save_pretrained` (safetensors).

    GPT-2's own initialisation (stddev 0.02) gives near-zero logits, under
    which a wrong mapping could still pass a 1e-4 check; weights of stddev
    0.2 and perturbed layer norms give logits of order one.
    """
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG))
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            is_norm_scale = ".ln_" in f".{name}" and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.2 * noise)
    model.save_pretrained(path)
    return os.fspath(path)


def write_tiny_tokenizer(path) -> None:
    """A vocab.json / merges.txt pair, so `from_preset` builds a tokenizer."""
    vocab = {"<|endoftext|>": 0, "Ġ": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
    vocab["ab"] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\na b\n")


def hf_lm(hf_dir) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


def keras_lm(hf_dir) -> keras_hub.models.GPT2CausalLM:
    """keras-hub's own converter reads the Hugging Face directory offline."""
    return keras_hub.models.GPT2CausalLM.from_preset(hf_dir, preprocessor=None)


def token_ids(batch=2, seq=10, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, HF_CONFIG["vocab_size"], (batch, seq)).astype("int32")


def torch_outputs(model, ids) -> np.ndarray:
    """Logits of a (PEFT-wrapped) GPT2LMHeadModel, or hidden states of a
    GPT2Model."""
    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long))
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return out.numpy()


def keras_outputs(model, ids) -> np.ndarray:
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    return np.asarray(keras.ops.convert_to_numpy(model(inputs, training=False)))


class Side:
    """One family's tiny model on disk, its ids, and base logits."""

    def __init__(self, case, hf_dir):
        self.case = case
        self.family = case.family
        self.hf_dir = hf_dir
        self.ids = np.random.default_rng(0).integers(0, VOCAB, (2, 10)).astype("int32")
        self.hf_base = self.hf_logits(self.hf_model())

    def hf_model(self):
        cls = getattr(transformers, self.case.hf_class)
        return cls.from_pretrained(self.hf_dir).eval()

    def hf_logits(self, model) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(self.ids, dtype=torch.long)).logits.numpy()

    def keras_lm(self):
        cls = getattr(keras_hub.models, self.case.causal_lm)
        return cls.from_preset(self.hf_dir, preprocessor=None)

    def keras_logits(self, lm) -> np.ndarray:
        inputs = {"token_ids": self.ids, "padding_mask": np.ones_like(self.ids)}
        return np.asarray(keras.ops.convert_to_numpy(lm(inputs, training=False)))

    def module(self, role: str) -> str:
        """The Hugging Face module name of a role, without its block."""
        return self.family.projection(role).hf_module.rpartition(".")[2]


def save_tiny_model(case, path) -> str:
    """A random transformers model with weights of order one (stddev 0.2,
    norm scales near 1), rounded to float16-representable values."""
    name, config = case.hf_config
    torch.manual_seed(0)
    model = getattr(transformers, case.hf_class)(getattr(transformers, name)(**config))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            noise = torch.randn_like(param)
            value = 1.0 + 0.1 * noise if "norm" in param_name else 0.2 * noise
            param.copy_(value.half().float())
    model.save_pretrained(path)
    return os.fspath(path)
