"""Greedy generations of `keras-lora sft` and `keras-lora generate --model`.

A prompt is what TRL trains the answer after: conversational prompts are
rendered with the chat template and `add_generation_prompt=True`, then
encoded without special tokens (the template writes them); plain prompt
strings are encoded with the tokenizer's special tokens (a BOS where the
model adds one). keras-hub's own `CausalLM.generate` decodes them (with its
cache, every prompt of a batch in one call, right-padded, no preprocessor),
so the model must be compiled with `sampler="greedy"`; a generation stops
at the template's end-of-turn token (`<|eot_id|>`, `<|im_end|>`,
`<end_of_turn>`, ...) or the tokenizer's EOS, else after `max_new_tokens`.
The tokens equal transformers' `generate(do_sample=False)` with those stop
ids as `eos_token_id` (the tests check it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.data import Example, read_examples
from keras_lora.recipes.sft.encode import Encoded
from keras_lora.recipes.sft.preset_tokenizer import PresetTokenizer
from keras_lora.recipes.sft.tokenizer import ModelTokenizer

__all__ = [
    "EvalGenerations",
    "Generation",
    "Prompt",
    "encode_prompt",
    "example_prompt",
    "generate",
    "stop_token_ids",
    "turn_end_token",
]

# The assistant text used to find where a template ends a turn.
_PROBE = "Yes"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt as the model reads it.

    Args:
        text: the rendered text (the chat template's output, or the plain
            prompt string).
        ids: its token ids.

    Example:

    >>> Prompt("Hi", [5, 6]).ids
    [5, 6]
    """

    text: str
    ids: list[int]


@dataclasses.dataclass(frozen=True)
class Generation:
    """The new tokens of one greedy generation.

    Args:
        ids: the generated ids, the stop token included when one ended it.
        stopped: whether a stop token ended it (else `max_new_tokens` did).
        text: the decoded answer, without the stop token.

    Example:

    >>> Generation([7, 2], True, "ok").stopped
    True
    """

    ids: list[int]
    stopped: bool
    text: str


def turn_end_token(tokenizer: ModelTokenizer | PresetTokenizer) -> str | None:
    """The special token the chat template ends an assistant turn with.

    Found by rendering a one-question conversation: the first special token
    after the assistant's text (`<|eot_id|>`, `<|im_end|>`,
    `<end_of_turn>`, or the EOS of templates that end turns with it).

    Args:
        tokenizer: the model's tokenizer and chat template.

    Returns:
        The token, or None without a template or when the turn ends in
        plain text.

    Example:

    >>> turn_end_token(load_tokenizer("QWEN_DIR"))  # doctest: +SKIP
    '<|im_end|>'
    """
    if tokenizer.chat_template_source is None:
        return None
    question = [{"role": "user", "content": "Hello?"}]
    try:
        prompt = tokenizer.template.render(question, add_generation_prompt=True)
        whole = tokenizer.template.render(
            [*question, {"role": "assistant", "content": _PROBE}]
        )
    except ValueError:
        return None  # A template that needs more (a system turn, tools).
    rest = whole[len(prompt) :] if whole.startswith(prompt) else ""
    at = rest.find(_PROBE)
    if at < 0:
        return None
    special = tokenizer.special_tokens_by_id()
    tail = tokenizer.encode(rest[at + len(_PROBE) :], add_special_tokens=False)
    for index in tail.ids:
        if index in special:
            return special[index]
    return None


def stop_token_ids(tokenizer: ModelTokenizer | PresetTokenizer) -> tuple[int, ...]:
    """The ids a generation stops at: the template's turn end, then EOS.

    Args:
        tokenizer: the model's tokenizer and chat template.

    Returns:
        The distinct ids, possibly none (the generation then runs to its
        length).

    Example:

    >>> stop_token_ids(load_tokenizer("LLAMA3_DIR"))  # doctest: +SKIP
    (128009,)
    """
    ids: list[int] = []
    for token in (turn_end_token(tokenizer), tokenizer.eos_token):
        index = None if token is None else tokenizer.token_to_id(token)
        if index is not None and index not in ids:
            ids.append(index)
    return tuple(ids)


def encode_prompt(
    tokenizer: ModelTokenizer | PresetTokenizer, prompt: str | list[dict]
) -> Prompt:
    """A prompt rendered and encoded as TRL encodes it before an answer.

    Args:
        tokenizer: the model's tokenizer and chat template.
        prompt: chat messages (rendered with `add_generation_prompt=True`,
            encoded without special tokens) or a plain string (encoded with
            the tokenizer's special tokens).

    Returns:
        The `Prompt`.

    Raises:
        ValueError: for messages and a model without a chat template.
    """
    if isinstance(prompt, str):
        return Prompt(prompt, tokenizer.encode(prompt).ids)
    text = tokenizer.template.render(prompt, add_generation_prompt=True)
    return Prompt(text, tokenizer.encode(text, add_special_tokens=False).ids)


def example_prompt(example: Example) -> str | list[dict[str, Any]] | None:
    """What the model is asked in an example: its prompt, or for `messages`
    the conversation before the last assistant turn; None for `text`.

    Example:

    >>> example_prompt(Example(line=1, prompt="2+2=", completion="4"))
    '2+2='
    >>> chat = [{"role": "user", "content": "Hi"},
    ...         {"role": "assistant", "content": "Hello"}]
    >>> example_prompt(Example(line=1, messages=chat))
    [{'role': 'user', 'content': 'Hi'}]
    """
    if example.prompt is not None:
        return example.prompt
    if example.messages is None:
        return None
    turns = [i for i, m in enumerate(example.messages) if m["role"] == "assistant"]
    return example.messages[: turns[-1]] if turns and turns[-1] > 0 else None


def generate(
    lm,
    tokenizer: ModelTokenizer | PresetTokenizer,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] | None = None,
) -> list[Generation]:
    """Greedy answers to `prompts`, in one `lm.generate` call.

    Args:
        lm: a keras-hub `CausalLM` without preprocessor, compiled with
            `sampler="greedy"`.
        tokenizer: the model's tokenizer (for the stop ids and decoding).
        prompts: encoded prompts.
        max_new_tokens: the most tokens each answer gets.
        stop_ids: ids that end an answer; None: `stop_token_ids(tokenizer)`.

    Returns:
        One `Generation` per prompt.

    Raises:
        ValueError: when the model is not compiled with a greedy sampler.

    Example:

    >>> lm.compile(sampler="greedy")  # doctest: +SKIP
    >>> chat = [{"role": "user", "content": "Hi"}]
    >>> prompt = encode_prompt(tok, chat)  # doctest: +SKIP
    >>> generate(lm, tok, [prompt], max_new_tokens=8)[0].text  # doctest: +SKIP
    'Hello! How are you?'
    """
    import keras_hub

    if not isinstance(getattr(lm, "sampler", None), keras_hub.samplers.GreedySampler):
        raise ValueError(
            "greedy generations need the model compiled with sampler='greedy' "
            "(lm.compile(..., sampler='greedy'))"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts:
        return []
    stops = tuple(stop_token_ids(tokenizer) if stop_ids is None else stop_ids)
    lengths = [len(p.ids) for p in prompts]
    # Shorter prompts run past max_new_tokens until the longest is done;
    # greedy tokens do not depend on the batch, so the extra is cut off.
    width = max(lengths) + max_new_tokens
    token_ids = np.zeros((len(prompts), width), dtype="int32")
    padding_mask = np.zeros((len(prompts), width), dtype=bool)
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt.ids)] = prompt.ids
        padding_mask[row, : len(prompt.ids)] = True
    out = lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask},
        stop_token_ids=stops or None,
    )
    rows = np.asarray(out["token_ids"])
    results = []
    for row, length in zip(rows, lengths, strict=True):
        ids = [int(i) for i in row[length : length + max_new_tokens]]
        end = next((k for k, i in enumerate(ids) if i in stops), None)
        if end is not None:
            ids = ids[: end + 1]
        answer = ids if end is None else ids[:-1]
        text = tokenizer.decode(answer)
        results.append(Generation(ids, end is not None, text))
    return results


class EvalGenerations:
    """Greedy generations for the first eval prompts, before and after.

    Args:
        prompts: the encoded prompts.
        tokenizer: the model's tokenizer.
        max_new_tokens: the most tokens each answer gets.

    Attributes:
        answers: `{"before": [...], "after": [...]}` texts, as `run` fills.

    Example:

    >>> gens = EvalGenerations([], None, 8)
    >>> gens.run(None, "before")
    >>> gens.records()
    []
    """

    def __init__(
        self,
        prompts: list[Prompt],
        tokenizer: ModelTokenizer | PresetTokenizer,
        max_new_tokens: int,
    ):
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.answers: dict[str, list[str]] = {}

    @classmethod
    def of(
        cls,
        config: SftConfig,
        examples: Sequence[Example],
        eval_examples: Sequence[Encoded],
        tokenizer: ModelTokenizer | PresetTokenizer,
    ) -> EvalGenerations:
        """The prompts of the first `config.generate_prompts` eval examples.

        Args:
            config: the run's `SftConfig` (`eval_data`, `columns`,
                `generate_prompts`, `generate_tokens`, `max_length`).
            examples: the training file's examples (the eval examples come
                from them without `eval_data`).
            eval_examples: the encoded eval examples (matched by line).
            tokenizer: the model's tokenizer and chat template.

        Returns:
            The `EvalGenerations` (no prompts for `text` data, or when
            `generate_prompts` is 0); prompts longer than `max_length`
            tokens are passed over.
        """
        count = config.generate_prompts
        if count and config.eval_data is not None:
            examples = read_examples(config.eval_data, config.columns)
        lines = {e.line for e in eval_examples}
        prompts: list[Prompt] = []
        for example in examples:
            if len(prompts) >= count:
                break
            asked = example_prompt(example)
            if example.line not in lines or asked is None:
                continue
            lines.discard(example.line)
            prompt = encode_prompt(tokenizer, asked)
            if len(prompt.ids) <= config.max_length:
                prompts.append(prompt)
        return cls(prompts, tokenizer, config.generate_tokens)

    def run(self, lm, when: str) -> None:
        """Generate the answers of `lm` now, recorded under `when`."""
        if self.prompts:
            found = generate(lm, self.tokenizer, self.prompts, self.max_new_tokens)
            self.answers[when] = [g.text for g in found]

    def records(self) -> list[dict[str, str]]:
        """`[{"prompt", "before", "after"}, ...]` for the report."""
        return [
            {"prompt": prompt.text}
            | {when: answers[i] for when, answers in self.answers.items()}
            for i, prompt in enumerate(self.prompts)
        ]
