"""Text into what GPT-2 trains on: a tokenizer learned from a corpus, its
preprocessor, batches of strings for `fit`, and windows of token ids.

The corpora themselves are `keras_lora.recipes.data`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from keras_lora.recipes.data import check_positive

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(
    texts: Sequence[str], vocabulary_size: int = 8192, min_frequency: int = 2
):
    """Train a GPT-2-style byte-level BPE tokenizer on `texts`.

    For models without a GPT-2 vocabulary at hand (random-weight
    architectures, offline machines). Uses the `tokenizers` package's
    `ByteLevelBPETokenizer` (the algorithm and pre-tokenisation of GPT-2)
    and returns a `keras_hub.models.GPT2Tokenizer` holding the learned
    vocabulary and merges in memory. `<|endoftext|>` is in the vocabulary,
    as GPT-2's preprocessor needs it.

    Args:
        texts: the training corpus.
        vocabulary_size: the largest vocabulary to learn (at least 257: the
            256 byte symbols plus `<|endoftext|>`); a small corpus may give
            fewer.
        min_frequency: merge only pairs seen this often.

    Returns:
        A `keras_hub.models.GPT2Tokenizer`.

    Example:

    >>> from keras_lora.recipes.data import default_corpus
    >>> tokenizer = train_tokenizer(default_corpus(max_documents=200), 1000)
    >>> tokenizer.vocabulary_size() <= 1000
    True
    """
    import json

    import keras_hub
    from tokenizers import ByteLevelBPETokenizer

    if int(vocabulary_size) < 257:
        raise ValueError(
            f"vocabulary_size must be at least 257 (256 bytes and "
            f"{END_OF_TEXT}), got {vocabulary_size}"
        )
    texts = list(texts)
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=int(vocabulary_size),
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        show_progress=False,
    )
    model = json.loads(bpe.to_str())["model"]
    # Older `tokenizers` write merges as "a b" strings, newer as pairs.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return keras_hub.models.GPT2Tokenizer(vocabulary=model["vocab"], merges=merges)


def make_preprocessor(tokenizer, sequence_length: int = 128):
    """A `GPT2CausalLMPreprocessor` over `tokenizer` at `sequence_length`."""
    import keras_hub

    check_positive("sequence_length", sequence_length)
    return keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )


def text_dataset(
    texts: Sequence[str],
    batch_size: int = 32,
    repeat: bool = False,
    shuffle_seed: int | None = None,
):
    """Batch strings into a `tf.data.Dataset` for `GPT2CausalLM.fit`.

    The task model's preprocessor tokenizes each batch, as in the keras.io
    example (`fit` on a dataset of raw strings).

    Args:
        texts: documents.
        batch_size: strings per batch.
        repeat: repeat forever (then pass `steps_per_epoch` to `fit`).
        shuffle_seed: shuffle the documents with this seed; `None` keeps
            their order.

    Returns:
        A `tf.data.Dataset` of string batches, prefetched.
    """
    import tensorflow as tf

    check_positive("batch_size", batch_size)
    texts = list(texts)
    if not texts:
        raise ValueError("no training documents: the corpus is empty")
    ds = tf.data.Dataset.from_tensor_slices(texts)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(texts), seed=shuffle_seed)
    # No .cache(): the strings are in memory already, and a cache read only
    # partly (fewer steps than one pass) makes TensorFlow warn.
    ds = ds.batch(batch_size)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def token_windows(
    texts: Sequence[str],
    tokenizer,
    length: int,
    max_rows: int | None = None,
    shuffle_seed: int | None = 0,
):
    """Cut tokenized text into rows of `length` consecutive token ids.

    The documents are tokenized, joined with the tokenizer's end-of-text
    token between them (as GPT-2 was trained) and cut into non-overlapping
    windows; a row of `seq + 1` ids gives inputs `row[:-1]` and next-token
    labels `row[1:]`. For token-level training and benchmarks that bypass
    the preprocessor (`keras-lora compare --tokens`).

    Args:
        texts: documents.
        tokenizer: a keras-hub tokenizer (e.g. from `train_tokenizer`).
        length: ids per row.
        max_rows: keep at most this many rows (after shuffling).
        shuffle_seed: shuffle the rows with this seed; `None` keeps the
            order of the text.

    Returns:
        An int32 NumPy array of shape `(rows, length)`.

    Example:

    >>> from keras_lora.recipes.data import default_corpus
    >>> texts = default_corpus(max_documents=50)
    >>> rows = token_windows(texts, train_tokenizer(texts, 500), length=33)
    >>> rows.shape[1]
    33
    """
    import numpy as np

    check_positive("length", length)
    check_positive("max_rows", max_rows, allow_none=True)
    texts = list(texts)
    if not texts:
        raise ValueError("no documents to tokenize: the corpus is empty")
    end = tokenizer.token_to_id(END_OF_TEXT)
    stream: list[int] = []
    # Tokenize in chunks: one call per document is slow in TensorFlow.
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start : start + 256]):
            stream.extend(np.asarray(ids).tolist())
            stream.append(end)
    rows = len(stream) // length
    if rows == 0:
        raise ValueError(
            f"the corpus has {len(stream)} tokens, fewer than one row of {length}"
        )
    windows = np.asarray(stream[: rows * length], dtype="int32").reshape(rows, length)
    if shuffle_seed is not None:
        windows = windows[np.random.default_rng(shuffle_seed).permutation(rows)]
    return windows[:max_rows] if max_rows else windows
