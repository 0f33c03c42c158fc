"""Scaling LoRA out with `keras.distribution` (JAX): GPT-2 layouts.

`gpt2_layout_map` shards keras-hub GPT-2 Megatron-style over a mesh with a
"batch" and a "model" axis, LoRA factors included; `distribute_lora` gives
LoRA factors created outside a distribution scope the layouts they would
have had inside it.

`keras.distribution` (`DataParallel`, `ModelParallel`) runs on the JAX
backend only. On TensorFlow, `tf.distribute.MirroredStrategy` replicates a
LoRA model like any Keras model: build, `inject_lora`, `compile` and `fit`
inside `strategy.scope()`. On torch, Keras has no distribution support and
`fit` no DDP support; torch `DistributedDataParallel` around the model,
built after `inject_lora`, with a plain torch training loop, works
(tests/test_distribution.py checks all three).
"""

from __future__ import annotations

import keras

from keras_lora.injection import lora_layers
from keras_lora.surgery import drop_compiled_functions

# Variable paths of keras-hub GPT-2 (base sizes; "..." = transformer_layer_i):
#   token_embedding/embeddings                      (50257, 768)  tied LM head
#   position_embedding/embeddings                   (1024, 768)
#   .../self_attention/{query,key,value}/kernel     (768, 12, 64)
#   .../self_attention/{query,key,value}/lora_a     (768, r)
#   .../self_attention/{query,key,value}/lora_b     (r, 12, 64)
#   .../self_attention/attention_output/kernel      (12, 64, 768)
#   .../self_attention/attention_output/lora_a      (12, 64, r)
#   .../self_attention/attention_output/lora_b      (r, 768)
#   .../feedforward_intermediate_dense/kernel       (768, 3072)
#   .../feedforward_intermediate_dense/lora_{a,b}   (768, r), (r, 3072)
#   .../feedforward_output_dense/kernel             (3072, 768)
#   .../feedforward_output_dense/lora_{a,b}         (3072, r), (r, 768)
# plus biases and layer norms, which no key matches (replicated).
#
# A LayoutMap looks a variable's path up as a regex over its keys, and a
# path that matches two keys raises. Every key here is anchored at both ends
# and names the variable itself ("/kernel", "/lora_a", "/lora_b"), so a key
# meant for a kernel never catches a LoRA factor (Keras issue 19496: keys
# like "decoder_block.*attention.*(query|key|value).*kernel" also caught
# ".../query/lora_kernel_a" and gave it the kernel's layout). The anchors
# make the keys mean the same under `re.fullmatch` (Keras 3.15) and
# `re.search` (earlier Keras 3), and `(?:.*/)?` lets the model sit under
# any parent path.
_ANY = r"^(?:.*/)?"
_BLOCK = _ANY + r"transformer_layer_\d+/"
_ATTENTION = _BLOCK + r"self_attention/"
_QKV = _ATTENTION + r"(?:query|key|value)/"
_ATTENTION_OUTPUT = _ATTENTION + r"attention_output/"
_INTERMEDIATE = _BLOCK + r"feedforward_intermediate_dense/"
_OUTPUT = _BLOCK + r"feedforward_output_dense/"


def gpt2_layout_map(
    device_mesh: keras.distribution.DeviceMesh,
    batch_dim_name: str = "batch",
    model_dim_name: str = "model",
    shard_embeddings: bool = True,
) -> keras.distribution.LayoutMap:
    """A `keras.distribution.LayoutMap` for keras-hub GPT-2 with LoRA.

    For `keras.distribution.ModelParallel` (JAX backend). The kernels are
    sharded on the model axis Megatron-style, and replicated over the batch
    axis (each batch shard holds a full model replica):

    | variable | shape (GPT-2 base) | layout |
    | --- | --- | --- |
    | query/key/value kernel | (768, 12, 64) | (None, model, None): heads |
    | attention_output kernel | (12, 64, 768) | (model, None, None): heads |
    | feedforward_intermediate kernel | (768, 3072) | (None, model) |
    | feedforward_output kernel | (3072, 768) | (model, None) |
    | token / position embeddings | (50257 / 1024, 768) | (None, model) |
    | biases, layer norms | | replicated |

    The column-parallel layers (query/key/value, feed-forward intermediate)
    produce head- or feature-sharded activations that the row-parallel
    layers (attention output, feed-forward output) consume without
    resharding; a block then needs one all-reduce per row-parallel layer
    (forward, and again backward).
    The embeddings are sharded on their hidden axis, not the vocabulary:
    JAX shards an axis only into equal parts, and GPT-2's 50257 tokens
    (29 x 1733) divide by no usual mesh size.

    LoRA factors get explicit layouts too; the rank axis is never sharded.
    With `shard_embeddings=True` every factor is sharded on the model axis
    along its large (feature) axis: query A (768, r) as (model, None), query
    B (r, 12, 64) as (None, model, None), attention-output A (12, 64, r) as
    (model, None, None), B (r, 768) as (None, model), and likewise for the
    feed-forward factors. With `shard_embeddings=False` the factors follow
    their kernel instead: the factor on the kernel's sharded axis is
    sharded like it (query B, attention-output A, intermediate B, output
    A), the other one is replicated.

    Measured (2 blocks of GPT-2 base width, vocabulary 50257, rank 8, LoRA
    on all six projections, mesh (2, 4), 4 x 128 tokens per replica;
    collectives counted in the compiled training step):

    | embeddings | LoRA factors | collectives | MB a step |
    | --- | --- | --- | --- |
    | sharded | sharded along the large axis (default) | 44 | 124.30 |
    | sharded | following their kernel | 56 | 124.58 |
    | sharded | replicated | 68 | 125.14 |
    | replicated | following their kernel (`shard_embeddings=False`) | 9 | 14.11 |
    | replicated | replicated | 21 | 14.67 |
    | replicated | sharded along the large axis | 44 | 124.30 |

    With sharded embeddings GSPMD keeps the activations sharded on the
    hidden axis, and a factor that is not sharded on that axis costs extra
    all-gathers of its gradient; with replicated embeddings, sharding A on
    the hidden axis drags the activations to hidden sharding. Chosen to
    match, the LoRA factors cost almost nothing (9 collectives are the
    Megatron all-reduces, with the LoRA partial products fused into them);
    the embeddings decide the rest. Sharded, the tied LM head ends in an
    all-reduce of the logits (tokens x 50257 floats: 103 MB of the 124 MB);
    replicated, every model shard computes the whole LM head (a third of
    GPT-2 base's parameters) and holds the whole embedding (154 MB for
    GPT-2 base). On 8 virtual CPU devices sharing 2 cores (compute-bound,
    no real interconnect) a step took 2.5 s with sharded and 5.2 s with
    replicated embeddings; on accelerators with a slow interconnect,
    `shard_embeddings=False` may win.

    The model axis size must divide the number of heads, the hidden and the
    intermediate size (GPT-2 base: 12 heads, so 1, 2, 3, 4, 6 or 12).

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` whose axis names
            include `batch_dim_name` and `model_dim_name` (other axes are
            allowed; weights are replicated over them).
        batch_dim_name: the mesh axis the data is split over; pass the same
            name to `ModelParallel(batch_dim_name=...)`.
        model_dim_name: the mesh axis the weights are sharded over.
        shard_embeddings: shard the token and position embeddings on their
            hidden axis (default), or replicate them; the LoRA factors'
            layouts follow this choice (see above).

    Returns:
        A `keras.distribution.LayoutMap`; each GPT-2 variable path matches
        at most one of its keys.

    Raises:
        ValueError: if `device_mesh` is not a `DeviceMesh`, lacks one of the
            two axis names, or the two names are the same.

    Example (any number of devices; on 8 accelerators use shape (2, 4)):

    >>> import keras, keras_hub
    >>> from keras_lora import inject_lora
    >>> devices = keras.distribution.list_devices()
    >>> mesh = keras.distribution.DeviceMesh(
    ...     (len(devices), 1), ("batch", "model"), devices)
    >>> distribution = keras.distribution.ModelParallel(
    ...     layout_map=gpt2_layout_map(mesh), batch_dim_name="batch")
    >>> with distribution.scope():  # build, inject, compile and fit in it
    ...     backbone = keras_hub.models.GPT2Backbone(
    ...         vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
    ...         intermediate_dim=32, max_sequence_length=16)
    ...     lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    ...     _ = inject_lora(lm, rank=4, targets=("query", "value"))
    >>> specs = {v.path: v.value.sharding.spec for v in lm.weights}  # JAX
    >>> tuple(specs["transformer_layer_0/self_attention/query/kernel"])
    (None, 'model', None)
    >>> tuple(specs["transformer_layer_0/self_attention/query/lora_a"])
    ('model', None)
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a keras.distribution.DeviceMesh, e.g. "
            "DeviceMesh((2, 4), ('batch', 'model'), "
            "keras.distribution.list_devices()). "
            f"Received: {type(device_mesh).__name__}"
        )
    names = tuple(device_mesh.axis_names)
    if batch_dim_name == model_dim_name:
        raise ValueError(
            "`batch_dim_name` and `model_dim_name` must name two different "
            f"mesh axes. Received: both {batch_dim_name!r}"
        )
    missing = [n for n in (batch_dim_name, model_dim_name) if n not in names]
    if missing:
        raise ValueError(
            f"The device mesh has axis names {names}, but gpt2_layout_map needs "
            f"a batch axis {batch_dim_name!r} and a model axis "
            f"{model_dim_name!r} (missing: {', '.join(map(repr, missing))}). "
            f"Create the mesh with axis_names=('{batch_dim_name}', "
            f"'{model_dim_name}'), or pass batch_dim_name=/model_dim_name=."
        )
    model = model_dim_name
    layout_map = keras.distribution.LayoutMap(device_mesh)

    embedding = (None, model) if shard_embeddings else (None, None)
    layout_map[_ANY + r"token_embedding/embeddings$"] = embedding
    layout_map[_ANY + r"position_embedding/embeddings$"] = embedding

    # Frozen kernels, Megatron-style.
    layout_map[_QKV + r"kernel$"] = (None, model, None)
    layout_map[_ATTENTION_OUTPUT + r"kernel$"] = (model, None, None)
    layout_map[_INTERMEDIATE + r"kernel$"] = (None, model)
    layout_map[_OUTPUT + r"kernel$"] = (model, None)

    # LoRA factors (see the docstring for the measurements).
    hidden = model if shard_embeddings else None
    layout_map[_QKV + r"lora_a$"] = (hidden, None)
    layout_map[_QKV + r"lora_b$"] = (None, model, None)
    layout_map[_ATTENTION_OUTPUT + r"lora_a$"] = (model, None, None)
    layout_map[_ATTENTION_OUTPUT + r"lora_b$"] = (None, hidden)
    layout_map[_INTERMEDIATE + r"lora_a$"] = (hidden, None)
    layout_map[_INTERMEDIATE + r"lora_b$"] = (None, model)
    layout_map[_OUTPUT + r"lora_a$"] = (model, None)
    layout_map[_OUTPUT + r"lora_b$"] = (None, hidden)
    return layout_map


def distribute_lora(
    model: keras.layers.Layer,
    distribution: keras.distribution.Distribution | None = None,
) -> keras.layers.Layer:
    """Give every LoRA factor the layout `distribution` assigns it.

    Keras lays a variable out when it is created, from the distribution
    active then. `inject_lora` and `load_adapter` create the LoRA factors,
    so inside `distribution.scope()` (or after
    `keras.distribution.set_distribution`) they are laid out already and
    this is not needed. Called on factors created outside any
    distribution (single-device arrays, which a distributed `fit` refuses
    to mix with sharded ones), it lays them out as the distribution says
    (the layout map's key for a `ModelParallel`, replicated for a
    `DataParallel`) and records the layout on the variable, so later
    `assign`s (`load_adapter`, `set_weights`) and optimizer slots follow
    it. Call it before the model's first `fit` after injection; a
    compiled step built for the old layouts is dropped.

    JAX backend only (like `keras.distribution`).

    Args:
        model: a model with `LoraLayer`s whose base weights are already
            distributed (built inside the distribution's scope).
        distribution: a `keras.distribution.Distribution`; defaults to the
            active one.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: on a backend other than JAX, with no distribution given
            or active, or for a model without LoRA layers.
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            "keras.distribution runs on the JAX backend only; this is "
            f"{keras.backend.backend()!r}. On TensorFlow, build the model and "
            "call inject_lora inside tf.distribute.MirroredStrategy().scope()."
        )
    distribution = distribution or keras.distribution.distribution()
    if distribution is None:
        raise ValueError(
            "distribute_lora needs a distribution: pass one, or call it inside "
            "`distribution.scope()` or after `keras.distribution."
            "set_distribution(distribution)`."
        )
    wrapped = lora_layers(model)
    if not wrapped:
        raise ValueError(
            f"Model '{model.name}' has no LoraLayer to distribute. Call "
            "`inject_lora(model)` (or `load_adapter`) first."
        )
    for layer in wrapped:
        for variable in (layer.lora_a, layer.lora_b):
            # A layout set earlier (by another distribution) would be
            # returned as it is: ask for this distribution's.
            variable._layout = None
            variable._layout = distribution.get_variable_layout(variable)
            variable.assign(variable.value)  # Lays the value out.
    drop_compiled_functions(model)
    return model
