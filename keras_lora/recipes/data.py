"""Text data and tokenizers for fine-tuning GPT-2, online or fully offline.

Three corpora:

- `default_corpus()`: the docstrings of Python standard-library modules,
  read from the running interpreter. Real English prose that exists on any
  machine with Python, so fine-tuning runs with no network at all.
- `text_corpus(path)`: plain text files or folders of them.
- `reddit_tifu_dataset()`: the Reddit TIFU posts of the keras.io GPT-2 LoRA
  example, through tensorflow-datasets. Needs the dataset downloaded once
  (network) or already prepared under `data_dir`.

Tokenizers, batches and token windows of these texts are
`keras_lora.recipes.tokenization`'s.
"""

from __future__ import annotations

import importlib
import inspect
import os
import platform
import re
import sys
from collections.abc import Iterable

from keras_lora.optional import require

# A fixed list (not sys.stdlib_module_names) so the corpus is the same on
# every run of one Python version; none of these has import side effects.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd",
    "collections", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message",
    "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser",
    "http.client", "http.cookies", "imaplib", "inspect", "io", "ipaddress",
    "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "netrc",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil",
    "platform", "poplib", "pprint", "pydoc", "queue", "quopri", "random",
    "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "turtle", "typing", "unittest.case",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "zipfile", "zoneinfo",
)  # fmt: skip


def default_corpus(
    max_documents: int | None = None, max_chars: int = 2_000_000
) -> list[str]:
    """Docstrings of Python standard-library modules, as documents.

    For each module of `STDLIB_MODULES` (in that order) the module docstring
    comes first, then those of its public classes, functions and methods,
    sorted by name. Doctest lines (`>>>`, `...`) are dropped and docstrings
    shorter than 200 characters skipped, which leaves prose. The result is
    deterministic for a given Python version (docstrings change between
    versions); `corpus_description()` says which one.

    Args:
        max_documents: keep at most this many documents.
        max_chars: stop once the documents hold this many characters.

    Returns:
        A list of strings, one docstring each.

    Example:

    >>> docs = default_corpus(max_documents=3)
    >>> len(docs)
    3
    """
    check_positive("max_documents", max_documents, allow_none=True)
    check_positive("max_chars", max_chars)
    documents: list[str] = []
    total = 0
    for text in _stdlib_docstrings():
        if max_documents is not None and len(documents) >= max_documents:
            break
        if total >= max_chars:
            break
        text = text[: max_chars - total]
        documents.append(text)
        total += len(text)
    return documents


def corpus_description() -> str:
    """Names the default corpus and the interpreter it was read from."""
    return (
        f"Python {platform.python_version()} standard-library docstrings "
        f"({len(STDLIB_MODULES)} modules, keras_lora.recipes.data.default_corpus)"
    )


def _stdlib_docstrings() -> Iterable[str]:
    for _, text in _stdlib_docstrings_by_module():
        yield text


def _stdlib_docstrings_by_module() -> Iterable[tuple[str, str]]:
    seen: set[int] = set()
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # A trimmed Python build may lack one (e.g. lzma).
            continue
        for obj in _documented_objects(module):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            text = _clean_docstring(inspect.getdoc(obj) or "")
            if len(text) >= 200:
                yield name, text


def _documented_objects(module) -> Iterable[object]:
    yield module
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != (
            module.__name__
        ):
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            yield member
        if inspect.isclass(member):
            for attr, method in sorted(vars(member).items()):
                if not attr.startswith("_") and inspect.isfunction(method):
                    yield method


def _clean_docstring(text: str) -> str:
    lines = [
        line
        for line in text.splitlines()
        if not line.lstrip().startswith((">>>", "... "))
    ]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# The docstring modules whose documents are held out from pretraining, so
# "loss on the original domain" is measured on text the base never saw.
HELDOUT_DOCSTRING_MODULES = STDLIB_MODULES[::10]

# The second domain: Python source code of these modules, docstrings and
# comments stripped (ast.unparse), so it shares no prose with the docstrings.
# Whole modules go to one side of the split, so no function is on both.
CODE_MODULES = (
    "argparse", "ast", "calendar", "configparser", "csv", "dataclasses",
    "datetime", "difflib", "email.message", "enum", "fractions", "functools",
    "gettext", "gzip", "heapq", "inspect", "ipaddress", "json.decoder",
    "json.encoder", "logging", "mailbox", "optparse", "pathlib", "pprint",
    "pydoc", "shlex", "shutil", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback",
    "typing", "unittest.case", "urllib.parse", "zipfile",
)  # fmt: skip

HELDOUT_CODE_MODULES = ("calendar", "fractions", "pprint", "shlex", "textwrap")


def docstring_split() -> tuple[list[str], list[str]]:
    """The docstring corpus split by module into (train, held-out).

    Modules in `HELDOUT_DOCSTRING_MODULES` are held out whole, so no
    document is on both sides. The pretrained base saw only the train side.

    Returns:
        `(train, heldout)` lists of documents.

    Example:

    >>> train, heldout = docstring_split()
    >>> len(train) > len(heldout) > 0, set(train).isdisjoint(heldout)
    (True, True)
    """
    train: list[str] = []
    heldout: list[str] = []
    for module, text in _stdlib_docstrings_by_module():
        (heldout if module in HELDOUT_DOCSTRING_MODULES else train).append(text)
    # inspect.getdoc inherits docstrings, so one text can come from two
    # modules: held-out text must be unseen (the train side stays as is,
    # which keeps the shipped base reproducible).
    seen = set(train)
    return train, [text for text in heldout if text not in seen]


def python_code_split(max_chars: int = 600_000) -> tuple[list[str], list[str]]:
    """Python standard-library source code, split by module (train, held-out).

    One document per top-level function or class of each module of
    `CODE_MODULES`, rewritten by `ast.unparse` (docstrings and comments
    dropped, formatting normalised), so the text is code only. Modules in
    `HELDOUT_CODE_MODULES` form the held-out side; the two sides never
    share a module, and a document found twice is kept once. Deterministic
    for one Python version.

    Args:
        max_chars: stop each side once it holds this many characters.

    Returns:
        `(train, heldout)` lists of documents.

    Example:

    >>> train, heldout = python_code_split(max_chars=20_000)
    >>> train[0].startswith(("def ", "class ", "async def ", "@"))
    True
    >>> set(train).isdisjoint(heldout)
    True
    """
    check_positive("max_chars", max_chars)
    sides: dict[bool, list[str]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    seen: set[str] = set()
    for module, text in _code_documents():
        if text in seen:  # The same code in two modules: keep it once.
            continue
        seen.add(text)
        side = module in HELDOUT_CODE_MODULES
        if sizes[side] < max_chars:
            sides[side].append(text)
            sizes[side] += len(text)
    return sides[False], sides[True]


def code_description() -> str:
    """Names the code corpus and its split."""
    return (
        f"Python {platform.python_version()} standard-library source code "
        f"({len(CODE_MODULES)} modules, docstrings and comments stripped; "
        f"held out: {', '.join(HELDOUT_CODE_MODULES)}; "
        "keras_lora.recipes.data.python_code_split)"
    )


def _code_documents() -> Iterable[tuple[str, str]]:
    import ast

    for name in CODE_MODULES:
        try:
            module = importlib.import_module(name)
            source = inspect.getsource(module)
        except (ImportError, OSError, TypeError):  # No source in this build.
            continue
        for node in ast.parse(source).body:
            if not isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
            ):
                continue
            _strip_docstrings(node)
            text = ast.unparse(node)
            if len(text) >= 200:
                yield name, text


def _strip_docstrings(tree) -> None:
    import ast

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list) or not body:
            continue
        first = body[0]
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]


def text_corpus(path: str | os.PathLike, split: str = "file") -> list[str]:
    """Read documents from a text file or a folder of text files.

    Args:
        path: a UTF-8 text file, or a folder: every `.txt` and `.md` file
            under it, in sorted path order.
        split: `"file"`: one document per file; `"paragraph"`: one document
            per blank-line-separated paragraph.

    Returns:
        A list of non-empty strings.

    Example:

    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "notes.txt").write_text("One.\\n\\nTwo.")
    >>> text_corpus(folder, split="paragraph")
    ['One.', 'Two.']
    """
    if split not in ("file", "paragraph"):
        raise ValueError(
            f"split must be 'file' or 'paragraph', got {split!r}: use "
            "'paragraph' for one document per blank-line-separated paragraph"
        )
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if name.endswith((".txt", ".md"))
        )
        if not files:
            raise FileNotFoundError(
                f"no .txt or .md files under {path!r}: put the training text "
                "in such files, or pass one text file"
            )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"text corpus {path!r} does not exist")
    documents = []
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts = re.split(r"\n\s*\n", text) if split == "paragraph" else [text]
        documents.extend(p.strip() for p in parts if p.strip())
    if not documents:
        raise ValueError(f"the text corpus at {path!r} is empty")
    return documents


def reddit_tifu_dataset(
    batch_size: int = 32,
    num_batches: int | None = None,
    split: str = "train",
    data_dir: str | None = None,
    download: bool = False,
):
    """Reddit TIFU documents, batched, as in the keras.io GPT-2 LoRA example.

    Exactly the example's pipeline: `tfds.load("reddit_tifu", split="train",
    as_supervised=True)`, keep the document, `.batch().cache().prefetch()`,
    `.take(num_batches)`.

    Args:
        batch_size: strings per batch.
        num_batches: keep only the first batches; `None` for all.
        split: the tfds split.
        data_dir: where tensorflow-datasets keeps prepared data (default
            `~/tensorflow_datasets`).
        download: allow tfds to download and prepare the dataset (640 MB,
            needs network); otherwise it must already be prepared.

    Returns:
        A `tf.data.Dataset` of batched document strings.

    Raises:
        OSError: when the dataset is not prepared and `download` is False,
            or when downloading fails.
    """
    import tensorflow as tf

    tfds = require("tensorflow_datasets", extra="reddit")

    check_positive("batch_size", batch_size)
    check_positive("num_batches", num_batches, allow_none=True)
    try:
        reddit_ds = tfds.load(
            "reddit_tifu",
            split=split,
            as_supervised=True,
            data_dir=data_dir,
            download=download,
        )
    except Exception as error:  # tfds raises many types; one message here.
        where = data_dir or os.path.join("~", "tensorflow_datasets")
        how = (
            "the download failed (no network?)"
            if download
            else f"it is not prepared under {where}"
        )
        raise OSError(
            f"reddit_tifu is unavailable: {how} ({type(error).__name__}). "
            "Prepare it once on a machine with network "
            "(tfds.load('reddit_tifu')) and pass its data_dir, or use the "
            "offline default corpus or a text path instead"
        ) from error
    train_ds = (
        reddit_ds.map(lambda document, _: document)
        .batch(batch_size)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )
    if num_batches is not None:
        train_ds = train_ds.take(num_batches)
    return train_ds


def dataset_texts(dataset, max_documents: int = 2000) -> list[str]:
    """The first `max_documents` strings of a batched string dataset."""
    texts: list[str] = []
    for batch in dataset:
        texts.extend(t.decode("utf-8", "replace") for t in batch.numpy())
        if len(texts) >= max_documents:
            break
    return texts[:max_documents]


def check_positive(name: str, value, allow_none: bool = False) -> None:
    """Refuse a count argument that is not a positive integer.

    Args:
        name: the argument's name, for the message.
        value: its value.
        allow_none: whether None (no limit) is accepted.

    Raises:
        ValueError: for anything but an int of at least 1 (or an allowed
            None); a bool is not a count.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


if __name__ == "__main__":  # Quick look: python -m keras_lora.recipes.data
    docs = default_corpus()
    print(corpus_description(), file=sys.stderr)
    print(f"{len(docs)} documents, {sum(map(len, docs)):,} characters")
