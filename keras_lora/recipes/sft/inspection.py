"""`keras-lora sft --inspect`: encode the data, write it and its report.

Users check their data (what is trained, what is cut) before spending
compute. Everything is read, validated and encoded before `OUT` is
touched, so bad data leaves nothing written; each file is written to a
temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import time

from keras_lora.files import atomic_write
from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.data import Example, read_examples
from keras_lora.recipes.sft.encode import EncodedData, encode_examples
from keras_lora.recipes.sft.tokenizer import ModelTokenizer, load_tokenizer

__all__ = [
    "DATA_REPORT",
    "ENCODED",
    "describe_shape",
    "inspect_data",
    "prepare_data",
    "summary",
]

ENCODED = "encoded.jsonl"
DATA_REPORT = "data_report.json"


def prepare_data(
    config: SftConfig,
) -> tuple[ModelTokenizer, list[Example], EncodedData]:
    """Load the tokenizer, read and encode the data of `config`.

    Args:
        config: the run's settings (`model`, `data`, columns, `max_length`,
            `loss_on`, `chat_template`).

    Returns:
        (tokenizer, examples, encoded data).

    Raises:
        DataError: bad data (one line naming the file and line).
        ValueError, FileNotFoundError: a missing model, file or template.

    Example:

    >>> _, _, data = prepare_data(SftConfig("MODEL", "d.jsonl", "o"))  # doctest: +SKIP
    >>> data.report()["kept"]  # doctest: +SKIP
    3
    """
    tokenizer = load_tokenizer(config.model, config.chat_template)
    examples = read_examples(config.data, config.columns)
    data = encode_examples(
        examples,
        tokenizer,
        max_length=config.max_length,
        loss_on=config.loss_on,
        source=os.path.basename(config.data),
    )
    return tokenizer, examples, data


def describe_shape(example: Example) -> str:
    """ "text", "plain prompt-completion", "conversational prompt-completion"
    or "messages".

    Example:

    >>> describe_shape(Example(line=1, prompt="a", completion="b"))
    'plain prompt-completion'
    """
    if example.shape == "prompt-completion":
        kind = "conversational" if example.conversational else "plain"
        return f"{kind} prompt-completion"
    return example.shape


def inspect_data(config: SftConfig) -> dict:
    """Encode the data and write `OUT/encoded.jsonl` and
    `OUT/data_report.json`.

    `encoded.jsonl` has one line per kept example, `{"input_ids": [...],
    "labels": [...]}` (labels unshifted, -100 where no loss).

    Args:
        config: the run's settings.

    Returns:
        The data report (also in `data_report.json`).

    Raises:
        DataError: bad data; nothing is written.

    Example:

    >>> report = inspect_data(SftConfig("MODEL", "d.jsonl", "out"))  # doctest: +SKIP
    >>> sorted(os.listdir("out"))  # doctest: +SKIP
    ['data_report.json', 'encoded.jsonl']
    """
    start = time.perf_counter()
    tokenizer, examples, data = prepare_data(config)
    report = {
        "model": config.model,
        "data": config.data,
        "shape": describe_shape(examples[0]),
        "chat_template": tokenizer.template_origin
        if examples[0].conversational
        else None,
        "loss_on": config.loss_on,
        **data.report(),
    }
    lines = "".join(
        json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n"
        for e in data.examples
    )
    os.makedirs(config.out, exist_ok=True)
    atomic_write(os.path.join(config.out, ENCODED), lines.encode("utf-8"))
    report["seconds"] = round(time.perf_counter() - start, 3)
    atomic_write(
        os.path.join(config.out, DATA_REPORT),
        (json.dumps(report, indent=2) + "\n").encode("utf-8"),
    )
    return report


def summary(report: dict) -> str:
    """The data report as a few lines for the terminal.

    Example:

    >>> print(summary({"data": "d.jsonl", "shape": "text", "examples": 2,
    ...     "kept": 2, "tokens": 10, "label_tokens": 10, "truncated": 0,
    ...     "dropped": 0, "max_length": 16, "longest": 6,
    ...     "length_histogram": {"1-16": 2}}))
    d.jsonl: 2 text examples; kept 2 (truncated to 16 tokens: 0, dropped: 0)
    tokens 10, label tokens 10 (100.0%), longest 6
    length   1-16: 2
    """
    share = 100.0 * report["label_tokens"] / max(report["tokens"], 1)
    lines = [
        f"{report['data']}: {report['examples']} {report['shape']} examples; "
        f"kept {report['kept']} (truncated to {report['max_length']} tokens: "
        f"{report['truncated']}, dropped: {report['dropped']})",
        f"tokens {report['tokens']}, label tokens {report['label_tokens']} "
        f"({share:.1f}%), longest {report['longest']}",
    ]
    width = max(len(key) for key in report["length_histogram"])
    for key, count in report["length_histogram"].items():
        lines.append(f"length {key:>{width}}: {count}")
    return "\n".join(lines)
