"""Saving a model's LoRA adapter to adapter files and loading one into a
model: `save_adapter`, `load_adapter`.

The files (factors in safetensors, a JSON config) and their checks are
`keras_lora.adapter_format`'s; here a model's layers are matched with the
file's entries, by their kernels' variable paths.
"""

from __future__ import annotations

import hashlib
import json
import os

import keras
import numpy as np
import safetensors
import safetensors.numpy

from keras_lora import adapter_state
from keras_lora.adapter_format import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_PATTERN,
    check_tensors,
    entry_lookup_only,
    entry_use_dora,
    read_adapter_config,
    read_weights,
)
from keras_lora.adapter_state import check_adapter_name
from keras_lora.embedding import base_weight, check_embedding
from keras_lora.files import atomic_write
from keras_lora.injection import add_named_adapter, wrap_layers
from keras_lora.layer import LoraLayer, check_wrappable
from keras_lora.quantized import base_weight_entries, kernel_path
from keras_lora.surgery import LayerIndex
from keras_lora.version import __version__


def save_adapter(
    model: keras.layers.Layer,
    path: str | os.PathLike,
    adapter_name: str | None = None,
) -> str:
    """Save one adapter of `model` (factors and layout) to directory `path`.

    Only the factors are written (a GPT-2 base adapter at rank 4 on
    query/value is about 0.6 MB; a DoRA adapter adds its magnitudes), with
    a JSON config that records the format version, each wrapped layer's
    path, rank, alpha, dropout, DoRA flag and shapes, the kernel dtype,
    the base model's class and a fingerprint of its architecture, and the
    package version. The write is atomic: an interrupted save leaves an
    earlier adapter at `path` loadable.

    A PiSSA/OLoRA adapter (whose layers hold residual kernels) is saved as
    what it adds to the ORIGINAL base kernels, PEFT's conversion: a plain
    adapter of rank 2r (A' = [A, A0], B' = [B; -B0], alpha doubled so the
    scale stays). It loads into the original base model and gives the
    trained model's outputs; training it further is plain LoRA of rank 2r.

    Args:
        model: a model with `LoraLayer`s.
        path: a directory; created if missing.
        adapter_name: which adapter to save (the file holds one, and
            records its name); may be left out when the model holds one.

    Returns:
        `path`, as a string.

    Raises:
        ValueError: if the model has no adapter, `adapter_name` is unknown,
            or is left out while the model holds several; `path` is a file.

    Example:

    >>> import tempfile
    >>> from keras_lora import inject_lora, lora_layers
    >>> def base_model():  # The same architecture, layer and model names.
    ...     return keras.Sequential(
    ...         [keras.Input((8,)), keras.layers.Dense(4, name="d")], name="m"
    ...     )
    >>> model = base_model()
    >>> _ = inject_lora(model, targets="d")
    >>> path = save_adapter(model, tempfile.mkdtemp() + "/adapter")
    >>> sorted(name.split(".")[0] for name in os.listdir(path))
    ['adapter_config', 'adapter_weights']
    >>> base = base_model()
    >>> [layer.name for layer in lora_layers(load_adapter(base, path))]
    ['d']
    """
    path = os.fspath(path)
    index = LayerIndex(model)
    all_lora = index.lora_layers()
    if not all_lora:
        raise ValueError(
            f"Model '{model.name}' has no LoraLayer, so there is no adapter to "
            "save. Call `inject_lora(model)` first."
        )
    known = list(dict.fromkeys(n for x in all_lora for n in x.adapters.names))
    if adapter_name is None and len(known) > 1:
        raise ValueError(
            f"Model '{model.name}' holds adapters {known}; pass "
            "`adapter_name=` to say which one to save (a file holds one)."
        )
    name = known[0] if adapter_name is None else adapter_name
    if name not in known:
        raise ValueError(
            f"Model '{model.name}' has no adapter {name!r}; its adapters are {known}."
        )
    wrapped = {
        key: layer.adapters[name]
        for key, layer in _lora_by_path(index).items()
        if name in layer.adapters
    }
    lora = {
        key: layer
        for key, layer in _lora_by_path(index).items()
        if name in layer.adapters
    }
    originals = {key: layer.original_layer for key, layer in lora.items()}
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"Cannot save an adapter to '{path}': it is a file. An adapter is "
            "a directory; pass a new or existing directory path."
        )
    tensors, converted = {}, {}
    for layer_path, layer in wrapped.items():  # `layer`: the adapter's record.
        # PiSSA/OLoRA: their rank-2r equivalent for the original kernel.
        a, b, rank, alpha = converted[layer_path] = layer.factors_for_original_kernel()
        tensors[f"{layer_path}/lora_a"] = np.ascontiguousarray(a)
        tensors[f"{layer_path}/lora_b"] = np.ascontiguousarray(b)
        if layer.use_dora:
            tensors[f"{layer_path}/lora_magnitude"] = _float32(layer.magnitude)
    data = safetensors.numpy.save(tensors, metadata={"format": FORMAT})
    digest = hashlib.sha256(data).hexdigest()
    weights_name = f"adapter_weights.{digest[:16]}.safetensors"
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "keras_lora_version": __version__,
        "keras_version": keras.__version__,
        "saved_on_backend": keras.backend.backend(),
        "weights_file": weights_name,
        "weights_sha256": digest,
        "adapter_name": name,
        "base_model": _base_model_info(model, all_lora),
        "layers": [
            {
                "path": layer_path,
                "class": type(originals[layer_path]).__name__,
                "rank": converted[layer_path][2],
                "alpha": converted[layer_path][3],
                "dropout": layer.dropout,
                "use_rslora": layer.use_rslora,
                "use_dora": layer.use_dora,
                "lora_a_shape": list(converted[layer_path][0].shape),
                "lora_b_shape": list(converted[layer_path][1].shape),
                "kernel_shape": list(base_weight(originals[layer_path]).shape),
                "kernel_dtype": keras.backend.standardize_dtype(
                    base_weight(originals[layer_path]).dtype
                ),
                **_head_entry(lora[layer_path]),
            }
            for layer_path, layer in wrapped.items()
        ],
    }
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, weights_name), data)
    atomic_write(
        os.path.join(path, CONFIG_NAME),
        json.dumps(config, indent=2).encode("utf-8"),
    )
    # Only now is the previous weights file unreferenced.
    for name in os.listdir(path):
        if WEIGHTS_PATTERN.fullmatch(name) and name != weights_name:
            os.remove(os.path.join(path, name))
    return path


def load_adapter(
    model: keras.layers.Layer,
    path: str | os.PathLike,
    adapter_name: str | None = None,
) -> keras.layers.Layer:
    """Load an adapter saved by `save_adapter` into `model`.

    Into a base model without LoRA, wraps exactly the saved layers (with
    their saved rank, alpha and dropout) and loads the factors; into a model
    that holds an adapter of that name, wrapped the same way, replaces its
    factors; into a model holding other adapters, adds this one beside
    them, inactive (see `keras_lora.switching.set_adapter`). The base model
    must be the one the adapter was trained on (same class and
    architecture).

    Args:
        model: the base model, with or without the same LoRA layout.
        path: an adapter directory.
        adapter_name: the name it gets in the model; by default the name
            it was saved under ("default" for files without one).

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: if `path` is not a readable adapter (missing, truncated
            or corrupted files, an unknown format version), if it does not
            fit the model (another base architecture, missing, extra or
            misshapen tensors, another LoRA layout). The model is left
            unchanged.
    """
    path = os.fspath(path)
    config = read_adapter_config(path)
    name = adapter_name or config.get("adapter_name") or "default"
    check_adapter_name(name)
    tensors = read_weights(path, config)
    # One walk of the tree serves every check and the wrapping.
    index = LayerIndex(model)
    all_lora = _lora_by_path(index)
    _check_base_model(model, config, list(all_lora.values()))
    saved = {entry["path"]: entry for entry in config["layers"]}
    check_tensors(tensors, saved)
    layers = _kernel_layers(model, index)
    wrapped = {k: v for k, v in all_lora.items() if name in v.adapters}
    if wrapped:
        _check_same_layout(wrapped, saved, name)
    elif all_lora:
        _add_beside(model, path, name, saved, all_lora, layers, index)
        wrapped = {k: v for k, v in _lora_by_path(index).items() if name in v.adapters}
    else:
        for layer_path, entry in saved.items():
            layer = layers.get(layer_path)
            if layer is None:
                raise ValueError(
                    f"The adapter at '{path}' wraps layer '{layer_path}', which "
                    f"model '{model.name}' does not have. Load it into the "
                    "base model it was trained on."
                )
            _check_wrappable(layer, entry)
            if list(base_weight(layer).shape) != entry["kernel_shape"]:
                raise ValueError(
                    f"Layer '{layer_path}' has kernel shape "
                    f"{tuple(base_weight(layer).shape)}, but the adapter was trained "
                    f"on {tuple(entry['kernel_shape'])}."
                )
        wrap_layers(
            model,
            {
                id(layers[layer_path]): {
                    "rank": entry["rank"],
                    "alpha": entry["alpha"],
                    "dropout": entry["dropout"],
                    "use_rslora": entry["use_rslora"],
                    "use_dora": entry_use_dora(entry),
                    "adapter_name": name,
                    **({"adapt_head": False} if entry_lookup_only(entry) else {}),
                }
                for layer_path, entry in saved.items()
            },
            index=index,
        )
        wrapped = _lora_by_path(index)
    for layer_path, layer in wrapped.items():
        adapter = layer.adapters[name]
        adapter.lora_a.assign(tensors[f"{layer_path}/lora_a"])
        adapter.lora_b.assign(tensors[f"{layer_path}/lora_b"])
        if adapter.use_dora:
            adapter.magnitude.assign(tensors[f"{layer_path}/lora_magnitude"])
    return model


def _add_beside(model, path, name, saved, all_lora, layers, index) -> None:
    """Add adapter `name` from a file to a model holding other adapters."""
    settings = {}
    for layer_path, entry in saved.items():
        layer = all_lora.get(layer_path)
        target = layer.original_layer if layer is not None else layers.get(layer_path)
        if target is None:
            raise ValueError(
                f"The adapter at '{path}' wraps layer '{layer_path}', which "
                f"model '{model.name}' does not have. Load it into the "
                "base model it was trained on."
            )
        if layer is None:
            _check_wrappable(target, entry)
        lookup_only = entry_lookup_only(entry)
        if layer is not None and lookup_only == getattr(layer, "adapt_head", True):
            raise ValueError(
                f"The adapter at '{path}' sets adapt_head={not lookup_only} "
                f"for embedding '{layer_path}', unlike the LoraEmbedding "
                "there (one setting per layer). Load it into a fresh base "
                "model."
            )
        if list(base_weight(target).shape) != entry["kernel_shape"]:
            raise ValueError(
                f"Layer '{layer_path}' has kernel shape "
                f"{tuple(base_weight(target).shape)}, but the adapter was trained "
                f"on {tuple(entry['kernel_shape'])}."
            )
        settings[id(layer if layer is not None else target)] = {
            "rank": entry["rank"],
            "alpha": entry["alpha"],
            "dropout": entry["dropout"],
            "use_rslora": entry["use_rslora"],
            "use_dora": entry_use_dora(entry),
            **({"adapt_head": False} if layer is None and lookup_only else {}),
        }
    add_named_adapter(model, settings, name, index=index)


def _check_base_model(model, config, wrapped: dict) -> None:
    saved, actual = config.get("base_model", {}), _base_model_info(model, wrapped)
    if saved.get("class") != actual["class"]:
        raise ValueError(
            f"The adapter was trained on a {saved.get('class')}, not a "
            f"{actual['class']}. Load it into the same kind of model."
        )
    if saved.get("fingerprint") != actual["fingerprint"]:
        raise ValueError(
            "The adapter was trained on a different base architecture "
            f"({saved.get('num_weights')} weights, "
            f"{saved.get('num_parameters', 0):,} parameters; this model: "
            f"{actual['num_weights']} weights, {actual['num_parameters']:,} "
            "parameters, or other weight paths or shapes). Load "
            "it into the base model it was trained on."
        )


def _check_same_layout(wrapped: dict, saved: dict, name: str = "default") -> None:
    if set(wrapped) != set(saved):
        raise ValueError(
            f"The model already has LoRA layers for adapter '{name}', but not "
            f"the file's: model wraps {sorted(wrapped)[:4]}..., adapter wraps "
            f"{sorted(saved)[:4]}.... Load it under another `adapter_name=`, "
            "call `merge_lora`, or load it into a fresh base model."
        )
    for layer_path, layer in wrapped.items():
        entry = saved[layer_path]
        ad = layer.adapters[name]
        if ad.rewrites_kernel:
            raise ValueError(
                f"Layer '{layer_path}' holds adapter '{name}' as PiSSA/OLoRA "
                "(its kernel is a residual), which factors from a file cannot "
                "replace exactly. Load the adapter into the original base "
                "model, or under another `adapter_name=` after `merge_lora`."
            )
        ours = (
            ad.rank,
            ad.alpha,
            ad.use_rslora,
            ad.use_dora,
            list(ad.lora_a.shape),
        )
        theirs = (
            entry["rank"],
            entry["alpha"],
            entry["use_rslora"],
            entry_use_dora(entry),
            entry["lora_a_shape"],
        )
        if ours != theirs:
            raise ValueError(
                f"Layer '{layer_path}' has rank, alpha, rslora, DoRA and A shape "
                f"{ours}; the adapter has {theirs}. Load it into a fresh base "
                "model, or one injected with the same settings."
            )


def _check_wrappable(layer, entry: dict) -> None:
    """Raise `ValueError` unless a file's entry can wrap `layer` (an
    embedding becomes a `LoraEmbedding`)."""
    if isinstance(layer, keras.layers.Embedding):
        check_embedding(layer, {"use_dora": entry_use_dora(entry)})
    else:
        check_wrappable(layer)


def _head_entry(layer) -> dict:
    """`{"adapt_head": False}` for a lookup-only tied embedding, else {}."""
    return {"adapt_head": False} if not getattr(layer, "adapt_head", True) else {}


def _layer_key(layer) -> str:
    return kernel_path(layer).rpartition("/")[0]


def _lora_by_path(index: LayerIndex) -> dict[str, LoraLayer]:
    return {_layer_key(layer.original_layer): layer for layer in index.lora_layers()}


def _kernel_layers(model, index: LayerIndex) -> dict[str, keras.layers.Layer]:
    """Unwrapped layers with a kernel, by key; keys must be unique."""
    layers = {}
    for layer in index.layers():
        if isinstance(layer, LoraLayer) or not (
            hasattr(layer, "kernel") or isinstance(layer, keras.layers.Embedding)
        ):
            continue
        key = _layer_key(layer)
        if key in layers:
            raise ValueError(
                f"Two layers of model '{model.name}' have kernels at path "
                f"'{key}'; adapters key layers by that path. Give the layers "
                "distinct names."
            )
        layers[key] = layer
    return layers


def _base_model_info(model, wrapped: list[LoraLayer]) -> dict:
    """Class and architecture fingerprint of the model without LoRA
    (`wrapped`: all its LoRA layers)."""
    lora_ids = {id(v) for layer in wrapped for v in layer.added_variables()}
    # The adapters' switches are no part of the base either.
    lora_ids |= {
        id(v) for layer in wrapped for v in adapter_state.control_variables(layer)
    }
    base_weights = [v for v in model.weights if id(v) not in lora_ids]
    # Quantized kernels count at their float shapes: an adapter trained over
    # a quantized base loads into the float base, and back.
    entries = base_weight_entries(model, lora_ids)
    cls = type(model)
    return {
        "class": f"{cls.__module__.split('.')[0]}.{cls.__name__}",
        "num_weights": len(base_weights),
        "num_parameters": sum(int(np.prod(v.shape)) for v in base_weights),
        "fingerprint": hashlib.sha256("\n".join(entries).encode()).hexdigest(),
    }


def _float32(variable) -> np.ndarray:
    return np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value), "float32")
