"""`keras-lora sft --merged-hf DIR`: the merged model for transformers.

The LoRA factors are merged into the base weights (`merge_lora`) and
`export_hf_model` writes `config.json` and `model.safetensors`; beside them
go the model directory's tokenizer files and chat template (the
`--chat-template` file, when given, as `chat_template.jinja`, which
transformers prefers to `tokenizer_config.json`'s), so that
`AutoModelForCausalLM` and `AutoTokenizer` load the directory as it is.
Everything is written into a temporary directory beside `DIR` that is
renamed to `DIR` when complete.
"""

from __future__ import annotations

import os
import shutil

from keras_lora import export_hf_model, merge_lora
from keras_lora.files import staging_directory

__all__ = ["TOKENIZER_FILES", "check_merged_dir", "write_merged_hf"]

# What transformers reads beside the weights: the tokenizer in any of its
# formats, the chat template and the generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
TEMPLATE_FILE = "chat_template.jinja"


def check_merged_dir(path: str) -> None:
    """Refuse a `--merged-hf` target that is not ours to replace.

    Args:
        path: the directory `write_merged_hf` will replace.

    Raises:
        ValueError: when `path` is a file, or a non-empty directory without
            `config.json` (not a model directory an earlier run wrote).

    Example:

    >>> import tempfile
    >>> check_merged_dir(os.path.join(tempfile.mkdtemp(), "merged"))
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--merged-hf {path} is a file: give a directory")
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"--merged-hf {path} is a directory that holds no model "
                "(no config.json); it would be replaced: give a new or empty "
                "directory"
            )


def write_merged_hf(
    lm, path: str, model_dir: str, chat_template: str | None = None
) -> str:
    """Merge `lm`'s LoRA and write it, with its tokenizer, to `path`.

    Args:
        lm: the trained keras-hub `CausalLM` (merged in place: its LoRA
            layers are gone afterwards).
        path: the directory to write (replaced when it exists).
        model_dir: the base model's Hugging Face directory (the tokenizer
            files come from there).
        chat_template: a template file overriding the directory's.

    Returns:
        The absolute path written.

    Raises:
        ValueError: from `check_merged_dir`, or when `export_hf_model`
            cannot write the family (nothing is written then).

    Example:

    >>> write_merged_hf(lm, "runs/merged", "HF_DIR")  # doctest: +SKIP
    '/abs/runs/merged'
    """
    check_merged_dir(path)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = staging_directory(parent, f".{os.path.basename(path)}-")
    try:
        built = os.path.join(staging, "model")
        export_hf_model(merge_lora(lm), built)
        for name in TOKENIZER_FILES:
            source = os.path.join(model_dir, name)
            if os.path.isfile(source) and not os.path.exists(os.path.join(built, name)):
                shutil.copyfile(source, os.path.join(built, name))
        if chat_template is not None:
            shutil.copyfile(chat_template, os.path.join(built, TEMPLATE_FILE))
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(built, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
