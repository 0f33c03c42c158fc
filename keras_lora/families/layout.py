"""`keras.distribution.LayoutMap`s built from a family's `Sharding` data.

A LayoutMap looks a variable's path up as a regex over its keys, and a path
that matches two keys raises. Every key built here is anchored at both ends
and names the variable itself ("/kernel", "/lora_a", "/lora_b"), so a key
meant for a kernel never catches a LoRA factor (Keras issue 19496: keys
like "decoder_block.*attention.*(query|key|value).*kernel" also caught
".../query/lora_kernel_a" and gave it the kernel's layout). A factor's
key also matches the factors of the layer's later adapters
(".../lora_a_<adapter name>"), which take the first adapter's layout. The anchors
make the keys mean the same under `re.fullmatch` (Keras 3.15) and
`re.search` (earlier Keras 3), and `(?:.*/)?` lets the model sit under any
parent path. Variables no key matches (biases, layer norms) are
replicated.
"""

from __future__ import annotations

import re

import keras

from keras_lora.families.family import HIDDEN, MODEL, Family

# Any parent path (a backbone inside a task model, a model inside another).
_ANY = r"^(?:.*/)?"
# "_<adapter name>" after a factor's name, or nothing (the first adapter).
_ADAPTER_SUFFIX = r"(?:_[A-Za-z0-9_.-]+)?"


def layout_map(
    family: Family,
    device_mesh: keras.distribution.DeviceMesh,
    batch_dim_name: str = "batch",
    model_dim_name: str = "model",
    shard_embeddings: bool = True,
) -> keras.distribution.LayoutMap:
    """A `keras.distribution.LayoutMap` for a family's models, with LoRA.

    For `keras.distribution.ModelParallel` (JAX backend). Each variable the
    family's `sharding` names gets its layout, with `MODEL` axes on
    `model_dim_name` and `HIDDEN` axes on it too when `shard_embeddings`,
    else replicated; weights are replicated over every other mesh axis.

    Args:
        family: a `Family` with `sharding` data.
        device_mesh: a `keras.distribution.DeviceMesh` whose axis names
            include `batch_dim_name` and `model_dim_name`.
        batch_dim_name: the mesh axis the data is split over; pass the same
            name to `ModelParallel(batch_dim_name=...)`.
        model_dim_name: the mesh axis the weights are sharded over.
        shard_embeddings: shard the `HIDDEN` axes (embeddings, and the LoRA
            factors' hidden-size axes), or replicate them.

    Returns:
        A `keras.distribution.LayoutMap`; each variable path of the family
        matches at most one of its keys.

    Raises:
        ValueError: if the family has no sharding data, `device_mesh` is
            not a `DeviceMesh`, lacks one of the two axis names, or the two
            names are the same.

    Example (a one-projection family, as a family module would define it):

    >>> from keras_lora.families.family import (
    ...     HIDDEN, MODEL, Family, Projection, Sharding)
    >>> toy = Family(
    ...     name="toy", backbone_class="ToyBackbone", block="block_{block}",
    ...     projections=(Projection("up", "mlp/up", "mlp.up"),),
    ...     default_targets=("up",), hf_block="layers.{block}",
    ...     hf_model_prefixes={"ToyModel": ""},
    ...     sharding=Sharding(
    ...         embeddings={"embed/embeddings": (None, HIDDEN)},
    ...         projections={"up": {"kernel": (None, MODEL),
    ...                             "lora_a": (HIDDEN, None)}}))
    >>> mesh = keras.distribution.DeviceMesh(
    ...     (2, 4), ("batch", "model"), [f"cpu:{i}" for i in range(8)])
    >>> layouts = layout_map(toy, mesh, shard_embeddings=False)
    >>> layouts["block_7/mlp/up/kernel"].axes, layouts["block_7/mlp/up/lora_a"].axes
    ((None, 'model'), (None, None))
    >>> layouts["block_7/mlp/up/bias"] is None  # replicated
    True
    """
    if family.sharding is None:
        raise ValueError(
            f"There is no layout data for {family.label} models: its family "
            "module sets no `sharding`."
        )
    _check_mesh(device_mesh, batch_dim_name, model_dim_name)
    axes = {
        MODEL: model_dim_name,
        HIDDEN: model_dim_name if shard_embeddings else None,
        None: None,
    }

    def resolve(layout):
        return tuple(axes[axis] for axis in layout)

    layouts = keras.distribution.LayoutMap(device_mesh)
    for path, layout in family.sharding.embeddings.items():
        layouts[_ANY + re.escape(path) + "$"] = resolve(layout)
    block = r"\d+".join(re.escape(part) for part in family.block.split("{block}"))
    for role, variables in family.sharding.projections.items():
        projection = _ANY + block + "/" + re.escape(family.projection(role).path)
        for variable, layout in variables.items():
            key = re.escape(variable)
            if variable.startswith("lora_"):
                # A layer's later adapters name their factors
                # "lora_a_<adapter>" (`keras_lora.adapter_state`): same layouts.
                key += _ADAPTER_SUFFIX
            layouts[f"{projection}/{key}$"] = resolve(layout)
    return layouts


def _check_mesh(device_mesh, batch_dim_name: str, model_dim_name: str) -> None:
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a keras.distribution.DeviceMesh, e.g. "
            "DeviceMesh((2, 4), ('batch', 'model'), "
            "keras.distribution.list_devices()). "
            f"Received: {type(device_mesh).__name__}"
        )
    if batch_dim_name == model_dim_name:
        raise ValueError(
            "`batch_dim_name` and `model_dim_name` must name two different "
            f"mesh axes. Received: both {batch_dim_name!r}"
        )
    names = tuple(device_mesh.axis_names)
    missing = [n for n in (batch_dim_name, model_dim_name) if n not in names]
    if missing:
        raise ValueError(
            f"The device mesh has axis names {names}, but the layout map needs "
            f"a batch axis {batch_dim_name!r} and a model axis "
            f"{model_dim_name!r} (missing: {', '.join(map(repr, missing))}). "
            f"Create the mesh with axis_names=('{batch_dim_name}', "
            f"'{model_dim_name}'), or pass batch_dim_name=/model_dim_name=."
        )
