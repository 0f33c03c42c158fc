"""Reading and validating instruction data in the three shapes TRL accepts.

- language modelling: `{"text": "..."}`;
- prompt-completion: `{"prompt": ..., "completion": ...}`, both strings or
  both lists of chat messages (conversational);
- conversational: `{"messages": [{"role": ..., "content": ...}, ...]}`.

Files: JSONL (one object a line, blank lines skipped), a JSON list, or
CSV/TSV with a header row whose columns are named by `Columns`. One file
holds one shape (TRL decides the shape from the first example too).

Every problem is a `DataError` whose message is one line naming the file,
the line and the problem, e.g. `data.jsonl line 3: invalid JSON (...)`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "ROLES",
    "Columns",
    "DataError",
    "Example",
    "read_examples",
]

# The roles chat templates know; anything else is almost always a typo
# ("assisstant", "bot") that a template would render silently or reject late.
ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT, PROMPT_COMPLETION, MESSAGES = "text", "prompt-completion", "messages"


class DataError(ValueError):
    """Bad training data: the message names the file, the line and the problem."""


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which CSV/TSV columns hold the data (JSON data uses the TRL keys).

    Args:
        text: the column of a language-modelling file.
        prompt: the prompt column of a prompt-completion file.
        completion: the completion column of a prompt-completion file.

    Example:

    >>> Columns(prompt="mr", completion="ref").prompt
    'mr'
    """

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None


@dataclasses.dataclass(frozen=True)
class Example:
    """One validated example.

    Exactly one shape is filled: `text`; `prompt` and `completion` (both
    strings, or both lists of `{"role", "content"}` dicts); or `messages`.

    Args:
        line: where the example starts in its file (1-based).
        text: the text of a language-modelling example.
        prompt: the prompt of a prompt-completion example.
        completion: its completion.
        messages: the messages of a conversational example.

    Example:

    >>> Example(line=1, text="hello").shape
    'text'
    """

    line: int
    text: str | None = None
    prompt: str | list[dict[str, Any]] | None = None
    completion: str | list[dict[str, Any]] | None = None
    messages: list[dict[str, Any]] | None = None

    @property
    def shape(self) -> str:
        """ "text", "prompt-completion" or "messages"."""
        if self.text is not None:
            return TEXT
        if self.messages is not None:
            return MESSAGES
        return PROMPT_COMPLETION

    @property
    def conversational(self) -> bool:
        """True when the example's content is chat messages."""
        return self.messages is not None or isinstance(self.prompt, list)


def read_examples(path: str, columns: Columns | None = None) -> list[Example]:
    """Read and validate every example of a data file.

    Args:
        path: a `.jsonl`, `.json` (a JSON list or JSONL), `.csv` or `.tsv` file.
        columns: the CSV/TSV column names; default: the TRL keys as column
            names (`text`, or `prompt` and `completion`).

    Returns:
        The examples, in file order; at least one.

    Raises:
        DataError: the first problem found, as one line naming the file and
            the line (invalid JSON, missing key, wrong type, unknown role,
            empty content, a shape different from the first example's).
        FileNotFoundError: if `path` does not exist.

    Example:

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> with open(path, "w") as f:
    ...     _ = f.write('{"prompt": "2+2=", "completion": "4"}\\n')
    >>> read_examples(path)[0].completion
    '4'
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file {path}")
    name = os.path.basename(path)
    extension = os.path.splitext(path)[1].lower()
    if extension in (".csv", ".tsv"):
        records = _csv_records(path, name, "\t" if extension == ".tsv" else ",")
        columns = columns or Columns()
    else:
        records = _json_records(path, name)
    examples = []
    first_shape = None
    for line, record in records:
        if extension in (".csv", ".tsv"):
            record = _from_columns(record, columns, name, line)
        example = _validate(record, name, line)
        if first_shape is None:
            first_shape = (example.shape, example.conversational)
        elif (example.shape, example.conversational) != first_shape:
            raise DataError(
                f"{name} line {line}: a {_describe(example)} example in a file "
                f"of {_describe_shape(*first_shape)} examples; one file holds "
                "one shape"
            )
        examples.append(example)
    if not examples:
        raise DataError(f"{name}: no examples")
    return examples


def _describe(example: Example) -> str:
    return _describe_shape(example.shape, example.conversational)


def _describe_shape(shape: str, conversational: bool) -> str:
    if shape == PROMPT_COMPLETION:
        return f"{'conversational' if conversational else 'plain'} {shape}"
    return shape


def _json_records(path: str, name: str) -> Iterator[tuple[int, Any]]:
    """(line, decoded value) for each example of a JSONL file or JSON list."""
    with open(path, encoding="utf-8") as f:
        try:
            content = f.read()
        except UnicodeDecodeError as error:
            raise DataError(f"{name}: not UTF-8 text ({error.reason})") from None
    if content.lstrip().startswith("["):
        yield from _json_list_records(content, name)
        return
    for number, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{name} line {number}: invalid JSON ({error.msg} at column "
                f"{error.colno})"
            ) from None
        yield number, value


def _json_list_records(content: str, name: str) -> Iterator[tuple[int, Any]]:
    """The items of a JSON list, each with the line it starts on, so that an
    error in item 500 of a pretty-printed file names its line."""
    decoder = json.JSONDecoder()
    position = content.index("[") + 1

    def skip(position: int) -> int:
        while position < len(content) and content[position] in " \t\r\n":
            position += 1
        return position

    def line_of(position: int) -> int:
        return content.count("\n", 0, position) + 1

    position = skip(position)
    if position < len(content) and content[position] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(content, position)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{name} line {error.lineno}: invalid JSON ({error.msg} at "
                f"column {error.colno})"
            ) from None
        yield line_of(position), value
        position = skip(end)
        if position < len(content) and content[position] == ",":
            position = skip(position + 1)
            continue
        if position < len(content) and content[position] == "]":
            if content[position + 1 :].strip():
                raise DataError(
                    f"{name} line {line_of(position + 1)}: invalid JSON (text "
                    "after the closing ']')"
                )
            return
        raise DataError(
            f"{name} line {line_of(position)}: invalid JSON (expected ',' or "
            "']' between list items)"
        )


def _csv_records(path: str, name: str, delimiter: str) -> Iterator[tuple[int, Any]]:
    """(line, {column: cell}) for each row; the header is line 1."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{name}: empty file (expected a header row)") from None
        except csv.Error as error:
            raise DataError(f"{name} line 1: invalid CSV ({error})") from None
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise DataError(f"{name} line {start}: invalid CSV ({error})") from None
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{name} line {start}: not UTF-8 text ({error.reason})"
                ) from None
            if row:
                if len(row) != len(header):
                    raise DataError(
                        f"{name} line {start}: {len(row)} cells, the header has "
                        f"{len(header)}"
                    )
                yield (
                    start,
                    {"__header__": header, **dict(zip(header, row, strict=True))},
                )
            start = reader.line_num + 1


def _from_columns(
    record: dict[str, str], columns: Columns, name: str, line: int
) -> dict[str, str]:
    """A CSV row as a TRL-shaped record, by the chosen column names."""
    header = record.pop("__header__")
    if columns.text is not None:
        wanted = {"text": columns.text}
    elif columns.prompt is not None or columns.completion is not None:
        wanted = {
            "prompt": columns.prompt or "prompt",
            "completion": columns.completion or "completion",
        }
    elif "text" in header:
        wanted = {"text": "text"}
    else:
        wanted = {"prompt": "prompt", "completion": "completion"}
    for column in wanted.values():
        if column not in header:
            raise DataError(
                f"{name} line 1: no column {column!r} (columns: "
                f"{', '.join(header)}); name the columns with --text-column, or "
                "--prompt-column and --completion-column"
            )
    return {key: record[column] for key, column in wanted.items()}


def _validate(record: Any, name: str, line: int) -> Example:
    """One record as an `Example`, or a `DataError` saying what is wrong."""
    where = f"{name} line {line}"
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: wrong type: an example is a JSON object, got "
            f"{type(record).__name__}"
        )
    if "messages" in record:
        messages = _messages(record["messages"], f"{where}: 'messages'")
        if not any(message["role"] == "assistant" for message in messages):
            raise DataError(f"{where}: 'messages' has no assistant message to learn")
        return Example(line=line, messages=messages)
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f"{where}: missing key {key!r}")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            _text(prompt, f"{where}: 'prompt'")
            _text(completion, f"{where}: 'completion'")
            return Example(line=line, prompt=prompt, completion=completion)
        if isinstance(prompt, list) and isinstance(completion, list):
            prompt = _messages(prompt, f"{where}: 'prompt'")
            completion = _messages(completion, f"{where}: 'completion'")
            return Example(line=line, prompt=prompt, completion=completion)
        raise DataError(
            f"{where}: wrong type: 'prompt' and 'completion' must both be "
            "strings or both be lists of messages, got "
            f"{_json_type(prompt)} and {_json_type(completion)}"
        )
    if "text" in record:
        _text(record["text"], f"{where}: 'text'")
        return Example(line=line, text=record["text"])
    keys = ", ".join(repr(key) for key in record) or "none"
    raise DataError(
        f"{where}: missing key: expected 'text', 'prompt' and 'completion', "
        f"or 'messages' (keys: {keys})"
    )


def _text(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise DataError(
            f"{where} has the wrong type: {_json_type(value)}, not a string"
        )
    if not value.strip():
        raise DataError(f"{where} is empty content")


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    """Checked chat messages; None-valued keys dropped, as transformers does
    before rendering."""
    if not isinstance(value, list):
        raise DataError(
            f"{where} has the wrong type: {_json_type(value)}, not a list of messages"
        )
    if not value:
        raise DataError(f"{where} is an empty list of messages")
    messages = []
    for index, message in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise DataError(
                f"{at} has the wrong type: {_json_type(message)}, not an object "
                "with 'role' and 'content'"
            )
        message = {key: item for key, item in message.items() if item is not None}
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{at}: missing key {key!r}")
        role = message["role"]
        if not isinstance(role, str):
            raise DataError(f"{at}: 'role' has the wrong type: {_json_type(role)}")
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r} (known: {', '.join(ROLES)})")
        _text(message["content"], f"{at}: 'content'")
        messages.append(message)
    return messages


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, as users see it in their file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
