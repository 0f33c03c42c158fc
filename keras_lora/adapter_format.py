"""Adapter files: the LoRA factors alone (safetensors) plus a JSON config.

An adapter is a directory:

    adapter_config.json                       what was wrapped, and how
    adapter_weights.<sha256[:16]>.safetensors the factors, keyed
                                              "<layer key>/lora_a|lora_b"
                                              (and "/lora_magnitude" for DoRA)

A layer's key is its kernel's Keras variable path without "/kernel"
("transformer_layer_0/self_attention/query"): variable paths come from
layer names given at build time, so they do not change when the same model
is built again in a process that already made one (where a top-level model
name would get a "_1" suffix).

The config names its weights file, and the file is named after its own
hash. A save writes the new weights file beside the old one, then replaces
the config in one atomic rename, then deletes the old weights: whenever a
save is interrupted, the config still names a complete weights file, so the
earlier adapter stays loadable. Loading is strict (missing, extra or
misshapen tensors, another base model, a damaged file: all `ValueError`,
with the model left unchanged) and never unpickles anything.

This module reads and checks those files on their own; `keras_lora.saving`
writes them from a model and loads them into one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import safetensors
import safetensors.numpy

CONFIG_NAME = "adapter_config.json"
FORMAT = "keras_lora.adapter"
FORMAT_VERSION = 1
WEIGHTS_PATTERN = re.compile(r"adapter_weights\.[0-9a-f]{16}\.safetensors")


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and validate the JSON config of the adapter at `path`.

    Args:
        path: an adapter directory written by `save_adapter`.

    Raises:
        ValueError: for a directory that is not an adapter, another format
            version, or a damaged config.
    """
    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"'{path}' is not a keras-lora adapter: {CONFIG_NAME} is missing. "
            "Pass a directory written by `save_adapter`."
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{config_path} is not valid JSON ({e}); the adapter is damaged. "
            "Save it again."
        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(
            f"{config_path} is not a keras-lora adapter config (no "
            f"'format': '{FORMAT}'). A PEFT adapter loads with `import_peft`."
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format version {config.get('format_version')!r}; "
            f"this keras-lora reads version {FORMAT_VERSION}. Upgrade keras-lora."
        )
    layers = config.get("layers")
    keys = ("path", "rank", "alpha", "dropout", "use_rslora", "lora_a_shape")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(e, dict) and all(k in e for k in keys) for e in layers)
        or not isinstance(config.get("weights_file"), str)
        or not WEIGHTS_PATTERN.fullmatch(config["weights_file"])
    ):
        raise ValueError(
            f"{config_path} is missing required fields; the adapter is damaged. "
            "Save it again."
        )
    return config


def read_weights(path: str, config: dict) -> dict[str, np.ndarray]:
    """The adapter's tensors, after checking the weights file's checksum.

    Args:
        path: the adapter directory.
        config: its config (`read_adapter_config`).

    Raises:
        ValueError: for a missing, truncated or corrupted weights file.
    """
    weights_path = os.path.join(path, config["weights_file"])
    try:
        with open(weights_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(
            f"Cannot read the adapter weights {weights_path} ({e.strerror}). "
            "The adapter is incomplete; save it again."
        ) from None
    if hashlib.sha256(data).hexdigest() != config.get("weights_sha256"):
        raise ValueError(
            f"{weights_path} does not match the checksum in {CONFIG_NAME}: the "
            "file is truncated or corrupted. Save the adapter again."
        )
    try:
        return safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError) as e:
        raise ValueError(
            f"{weights_path} is not a valid safetensors file ({e})."
        ) from None


def check_tensors(tensors: dict, saved: dict) -> None:
    """Refuse tensors that are not exactly what the config lists, in the
    shapes it gives.

    Args:
        tensors: the adapter's tensors (`read_weights`).
        saved: the config's layer entries by layer key.

    Raises:
        ValueError: for missing or extra tensors, or wrong shapes.
    """
    expected = {
        f"{p}/{name}"
        for p, entry in saved.items()
        for name in ("lora_a", "lora_b")
        + (("lora_magnitude",) if entry_use_dora(entry) else ())
    }
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(
            "The adapter's weights do not match its config: "
            + (f"missing {missing[:4]}" if missing else "")
            + (" " if missing and extra else "")
            + (f"unexpected {extra[:4]}" if extra else "")
            + ". The adapter is damaged; save it again."
        )
    for layer_path, entry in saved.items():
        rank = entry["rank"]
        a_shape = tuple(entry["lora_a_shape"])
        b_shape = tuple(entry.get("lora_b_shape", ()))
        a, b = tensors[f"{layer_path}/lora_a"], tensors[f"{layer_path}/lora_b"]
        if (
            a.shape != a_shape
            or b.shape != b_shape
            or a_shape[-1:] != (rank,)
            or b_shape[:1] != (rank,)
        ):
            raise ValueError(
                f"Adapter tensors for '{layer_path}' have shapes {a.shape} and "
                f"{b.shape}; the config says {a_shape} and {b_shape} at rank "
                f"{rank}. The adapter is damaged; save it again."
            )
        magnitude = tensors.get(f"{layer_path}/lora_magnitude")
        if magnitude is not None and magnitude.shape != b_shape[1:]:
            raise ValueError(
                f"The DoRA magnitude for '{layer_path}' has shape "
                f"{magnitude.shape}; B {b_shape} needs {b_shape[1:]}. The "
                "adapter is damaged; save it again."
            )


def entry_lookup_only(entry: dict) -> bool:
    """Whether a saved embedding adapts its lookup only (`adapt_head`).

    Args:
        entry: one layer entry of an adapter config.

    Raises:
        ValueError: for an `adapt_head` that is not a bool.
    """
    return not _flag(entry, "adapt_head", True)


def entry_use_dora(entry: dict) -> bool:
    """A saved layer's DoRA flag (files from before DoRA have none).

    Args:
        entry: one layer entry of an adapter config.

    Raises:
        ValueError: for a `use_dora` that is not a bool.
    """
    return _flag(entry, "use_dora", False)


def _flag(entry: dict, key: str, default: bool) -> bool:
    """A layer entry's bool `key` (`default` when absent); `ValueError`
    naming the layer for any other type."""
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(
            f"Layer '{entry['path']}' has `{key}={value!r}` in the adapter "
            "config; it must be true or false. The adapter is damaged."
        )
    return value
