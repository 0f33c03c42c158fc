"""Small models and data shared by the tests (keras-hub style helpers)."""

from __future__ import annotations

import contextlib

import keras
import keras_hub
import numpy as np

VOCAB = 64
SEQ = 8
# The backend tests/test_install.py runs the installed demo under.
DEMO_BACKEND = "jax"


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


def expected_axes(path: str, ndim: int, shard_embeddings: bool = True) -> list:
    """The layout gpt2_layout_map should give a GPT-2 weight, written out
    independently of its regexes."""
    layer, variable = path.split("/")[-2:]
    m = "model"
    h = m if shard_embeddings else None  # the factors' hidden-size axes
    if layer in ("query", "key", "value"):
        layer = "qkv"
    table = {
        ("token_embedding", "embeddings"): (None, h),
        ("position_embedding", "embeddings"): (None, h),
        ("qkv", "kernel"): (None, m, None),
        ("qkv", "lora_a"): (h, None),
        ("qkv", "lora_b"): (None, m, None),
        ("attention_output", "kernel"): (m, None, None),
        ("attention_output", "lora_a"): (m, None, None),
        ("attention_output", "lora_b"): (None, h),
        ("feedforward_intermediate_dense", "kernel"): (None, m),
        ("feedforward_intermediate_dense", "lora_a"): (h, None),
        ("feedforward_intermediate_dense", "lora_b"): (None, m),
        ("feedforward_output_dense", "kernel"): (m, None),
        ("feedforward_output_dense", "lora_a"): (m, None),
        ("feedforward_output_dense", "lora_b"): (None, h),
    }
    return list(table.get((layer, variable), (None,) * ndim))


def device_mesh(names=("batch", "model")) -> keras.distribution.DeviceMesh:
    """A (2, 4) mesh of device names: a LayoutMap never touches the devices."""
    return keras.distribution.DeviceMesh((2, 4), names, [f"cpu:{i}" for i in range(8)])


def small_mlp() -> keras.Sequential:
    """An 8 -> 16 -> 4 MLP ("up", "down"), the same random base each call."""
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="up"),
            keras.layers.Dense(4, name="down"),
        ],
        name="small_mlp",
    )
    rng = np.random.default_rng(0)
    for w in model.weights:  # The same base in every model built here.
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    return model


def randomize_adapter(model, name, seed):
    """Give adapter `name`'s B factors non-zero values, as training would."""
    from keras_lora import lora_layers

    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        if name in layer.adapters:
            b = layer.adapters[name].lora_b
            b.assign(rng.normal(0, 0.3, b.shape).astype("float32"))


# A batch for `small_mlp`.
MLP_X = np.random.default_rng(1).normal(size=(6, 8)).astype("float32")


def two_adapters():
    """MLP with "default" (rank 2, on up) and "b" (rank 3, on up and down),
    and each adapter's outputs when it was the model's only adapter."""
    from keras_lora import inject_lora, lora_layers

    model = small_mlp()
    base = to_numpy(model(MLP_X))
    inject_lora(model, rank=2, alpha=4.0, targets="up", seed=1)
    randomize_adapter(model, "default", 1)
    out_a = to_numpy(model(MLP_X))
    alone_b = small_mlp()
    inject_lora(alone_b, rank=3, alpha=6.0, targets=("up", "down"), seed=2)
    randomize_adapter(alone_b, "default", 2)
    out_b = to_numpy(alone_b(MLP_X))
    inject_lora(model, rank=3, alpha=6.0, targets=("up", "down"), adapter_name="b")
    # "b" gets the factors the lone model trained.
    lone = {layer.name: layer for layer in lora_layers(alone_b)}
    for layer in lora_layers(model):
        for ours, theirs in zip(
            layer.adapters["b"].variables,
            lone[layer.name].adapters["default"].variables,
            strict=True,
        ):
            ours.assign(theirs.value)
    return model, base, out_a, out_b
