"""Recipes around a saved adapter: generate, merge, PEFT export and import.

Each loads a GPT-2 base (`models.load_task`), or for `generate_hf` a
Hugging Face model directory of any family, applies an adapter directory
and does one thing, returning what the caller reports. Paths are checked
before any model is built, so a typo fails fast.
"""

from __future__ import annotations

import os

from keras_lora.recipes import models


def load_with_adapter(
    preset: str,
    adapter: str | None = None,
    sequence_length: int = 128,
    tokenizer: str | None = None,
):
    """A GPT-2 from `preset` with the adapter directory `adapter` applied.

    Args:
        preset: keras-hub preset name, local Keras preset or Hugging Face dir.
        adapter: a `save_adapter` directory, or None for the base alone.
        sequence_length: the preprocessor's sequence length.
        tokenizer: a directory with vocab.json and merges.txt.

    Returns:
        `(lm, {"weights": ..., "tokenizer": ...})`.

    Raises:
        FileNotFoundError: for a missing directory.
        ValueError: for an adapter that does not fit the model.
    """
    from keras_lora import load_adapter

    models.check_path(adapter, "adapter")
    lm, labels = models.load_task(preset, sequence_length, tokenizer)
    if adapter:
        load_adapter(lm, adapter)
    return lm, labels


def generate(
    preset: str,
    prompts,
    adapter: str | None = None,
    merge: bool = False,
    max_length: int = 40,
    sequence_length: int = 128,
    tokenizer: str | None = None,
):
    """Greedy generations of the base model, with the adapter if given.

    Args:
        preset, adapter, sequence_length, tokenizer: as `load_with_adapter`.
        prompts: the prompts.
        merge: merge the adapter into the kernels first.
        max_length: generation length in tokens.

    Returns:
        `(outputs, labels)`: one string per prompt, and the model's labels.
    """
    from keras_lora import merge_lora

    lm, labels = load_with_adapter(preset, adapter, sequence_length, tokenizer)
    if merge and adapter:
        merge_lora(lm)
    lm.compile(sampler="greedy")
    return models.generate(lm, prompts, max_length), labels


def generate_hf(
    model_dir: str,
    prompts: list[str],
    chat: bool = False,
    adapter: str | None = None,
    merge: bool = False,
    max_new_tokens: int = 32,
    chat_template: str | None = None,
) -> tuple[list[str], dict]:
    """Greedy answers of a Hugging Face model directory or a keras-hub
    preset (+ adapter).

    Prompts are encoded as `keras-lora sft` trains them
    (`keras_lora.recipes.sft.generation`): with `chat`, each is one user
    message rendered with the chat template and `add_generation_prompt`;
    else a plain string with the tokenizer's special tokens. An answer stops
    at the template's end-of-turn token or EOS.

    Args:
        model_dir: a local Hugging Face model directory (weights, tokenizer,
            chat template) of a family keras-hub converts, or a keras-hub
            preset (name or `save_to_preset` directory; its family's
            built-in template, as `keras-lora sft` uses).
        prompts: the prompts (user messages with `chat`).
        chat: render the prompts with the chat template.
        adapter: a `save_adapter` directory (`keras-lora sft`'s
            `OUT/adapter`), or None for the base alone.
        merge: merge the adapter into the kernels first.
        max_new_tokens: the most tokens of each answer.
        chat_template: a template file overriding the directory's.

    Returns:
        `(answers, {"model": ..., "chat_template": where it came from})`,
        each answer without its prompt and stop token.

    Raises:
        FileNotFoundError: a missing directory or file.
        ValueError: no chat template for `chat`, or an adapter that does
            not fit the model.

    Example:

    >>> generate_hf("HF_DIR", ["What is LoRA?"], chat=True)  # doctest: +SKIP
    (['A low-rank adapter.'], {'model': 'HF_DIR', 'chat_template': ...})
    """
    from keras_lora import load_adapter, merge_lora
    from keras_lora.recipes.sft.generation import encode_prompt, generate
    from keras_lora.recipes.sft.run import load_causal_lm
    from keras_lora.recipes.sft.tokenizer import load_tokenizer

    models.check_path(adapter, "adapter")
    tokenizer = load_tokenizer(model_dir, chat_template)
    encoded = [
        encode_prompt(tokenizer, [{"role": "user", "content": p}] if chat else p)
        for p in prompts
    ]
    lm = load_causal_lm(model_dir)
    if adapter:
        load_adapter(lm, adapter)
        if merge:
            merge_lora(lm)
    lm.compile(sampler="greedy")
    answers = [g.text for g in generate(lm, tokenizer, encoded, max_new_tokens)]
    return answers, {"model": model_dir, "chat_template": tokenizer.template_origin}


# What `merge_to_preset` writes: a keras-hub preset or a Hugging Face model.
MERGE_FORMATS = ("keras", "hf")


def merge_to_preset(
    preset: str,
    adapter: str,
    out: str,
    sequence_length: int = 128,
    tokenizer: str | None = None,
    output_format: str = "keras",
) -> dict:
    """Merge an adapter into the base and save the merged model.

    Args:
        output_format: "keras" writes a local keras-hub preset; "hf" a Hugging Face
            model directory (`transformers.AutoModelForCausalLM` loads it).

    Returns:
        `{"layers": LoRA layers merged, "weights": the base's label,
        "preset": absolute path of the written directory}`.

    Raises:
        ValueError: for another `output_format`.
    """
    from keras_lora import export_hf_model, lora_layers, merge_lora

    if output_format not in MERGE_FORMATS:
        raise ValueError(
            f"Unknown merge format {output_format!r}; use one of "
            f"{', '.join(MERGE_FORMATS)}."
        )
    lm, labels = load_with_adapter(preset, adapter, sequence_length, tokenizer)
    count = len(lora_layers(lm))
    merge_lora(lm)
    if output_format == "hf":
        export_hf_model(lm, out)
    else:
        lm.save_to_preset(out)
    return {
        "layers": count,
        "weights": labels["weights"],
        "preset": os.path.abspath(out),
    }


def export_peft_dir(
    preset: str,
    adapter: str,
    out: str,
    base_model_name: str | None = None,
    sequence_length: int = 128,
    tokenizer: str | None = None,
) -> str:
    """Write an adapter as a Hugging Face PEFT adapter directory; its path."""
    from keras_lora import export_peft

    lm, _ = load_with_adapter(preset, adapter, sequence_length, tokenizer)
    path = export_peft(lm, out, base_model_name_or_path=base_model_name)
    return os.path.abspath(path)


def import_peft_dir(
    preset: str,
    peft_dir: str,
    out: str,
    sequence_length: int = 128,
    tokenizer: str | None = None,
) -> dict:
    """Read a Hugging Face PEFT adapter and save it as a keras-lora adapter.

    Returns:
        `{"layers": LoRA layers imported, "adapter": absolute path written}`.
    """
    from keras_lora import import_peft, lora_layers, save_adapter

    models.check_path(peft_dir, "PEFT adapter")
    lm, _ = models.load_task(preset, sequence_length, tokenizer)
    import_peft(lm, peft_dir)
    path = save_adapter(lm, out)
    return {"layers": len(lora_layers(lm)), "adapter": os.path.abspath(path)}
