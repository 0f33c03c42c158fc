"""Small models and data shared by the tests (keras-hub style helpers)."""

from __future__ import annotations

import contextlib

import keras
import keras_hub
import numpy as np

VOCAB = 64
SEQ = 8


def tiny_gpt2_backbone(**overrides) -> keras_hub.models.GPT2Backbone:
    config = dict(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )
    config.update(overrides)
    return keras_hub.models.GPT2Backbone(**config)


def gpt2_base_backbone() -> keras_hub.models.GPT2Backbone:
    """The GPT-2 base (124M) architecture, with random weights."""
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=50257,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        intermediate_dim=3072,
        max_sequence_length=1024,
    )


def tiny_gpt2_lm(**overrides) -> keras_hub.models.GPT2CausalLM:
    return keras_hub.models.GPT2CausalLM(
        backbone=tiny_gpt2_backbone(**overrides), preprocessor=None
    )


def token_batch(batch=4, seq=SEQ, vocab=VOCAB, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, vocab, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }


def learnable_lm(**overrides) -> keras_hub.models.GPT2CausalLM:
    """A tiny GPT-2 whose token embeddings have a trained model's scale.

    keras-hub initialises embeddings with stddev 0.02, and GPT-2 ties them
    to the output head: random logits then barely move, whatever the
    adapter learns. A 0.25 scale lets a few steps visibly lower the loss.
    """
    lm = tiny_gpt2_lm(**overrides)
    embeddings = lm.backbone.token_embedding.embeddings
    rng = np.random.default_rng(0)
    embeddings.assign(rng.normal(0, 0.25, embeddings.shape).astype("float32"))
    return lm


def constant_token_task(batch=8, seq=SEQ, vocab=VOCAB, target=5, seed=0):
    """Random prompts whose every next token is `target`: x, y, weights."""
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(0, vocab, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }
    return x, np.full((batch, seq), target, "int32"), np.ones((batch, seq), "float32")


def mlp(activation="relu") -> keras.Sequential:
    """The 784-128-256-10 MLP of seed 04, with fixed layer names."""
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(128, activation=activation, name="hidden_1"),
            keras.layers.Dense(256, activation=activation, name="hidden_2"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="mlp",
    )


def functional_mlp() -> keras.Model:
    inputs = keras.Input((12,))
    x = keras.layers.Dense(16, activation="gelu", name="up")(inputs)
    x = keras.layers.Dense(12, name="down")(x)
    outputs = keras.layers.Add(name="residual")([inputs, x])
    return keras.Model(inputs, outputs, name="functional_mlp")


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def snapshot(model) -> dict[str, np.ndarray]:
    """A copy of every weight, keyed by path."""
    return {w.path: to_numpy(w.value).copy() for w in model.weights}


def randomize_lora_b(model, scale=0.1, seed=0) -> None:
    """Give every LoRA B a non-zero value, as training would."""
    from keras_lora import lora_layers

    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        shape = tuple(layer.lora_b.shape)
        layer.lora_b.assign(rng.normal(0, scale, shape).astype("float32"))


@contextlib.contextmanager
def dtype_policy(name: str):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def trainable_count(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def count_walks(monkeypatch) -> list[str]:
    """Record every walk of a layer tree (`walk_layers`) from now on: the
    returned list gets the walked model's name for each."""
    import keras_lora.surgery as surgery

    calls = []
    real = surgery.walk_layers

    def counting(model):
        calls.append(model.name)
        return real(model)

    monkeypatch.setattr(surgery, "walk_layers", counting)
    return calls
