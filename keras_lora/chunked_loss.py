"""Causal-LM cross-entropy in chunks, so the full logits never exist at once.

A language model's loss needs the logits of every token over the whole
vocabulary: for GPT-2 at batch 8 x 128 that is 8 x 128 x 50257 float32
values, 0.2 GB per copy, and autodiff keeps the logits, their softmax and
their gradient. `ChunkedCausalLM` trains the same model on the same loss
while only one chunk of the sequence has logits at a time: its forward pass
returns the hidden states, and its `compute_loss` runs the output
projection and the cross-entropy one chunk of positions after another, each
chunk rematerialised (`keras.remat`), so the backward pass recomputes that
chunk's logits instead of keeping them. On JAX, equal chunks run as a
`lax.scan` over a checkpointed body instead, so that XLA cannot recompute
them all at once (`_scanned_jax`).

It needs only two things of the model, so it is not tied to a family:
`hidden`, a layer or model mapping the inputs to hidden states, and `head`,
the layer that maps hidden states to logits (called with `head_kwargs`). For
a keras-hub `CausalLM` whose `call` is `backbone.token_embedding(backbone(x),
reverse=True)` (GPT-2, Llama, Mistral, Qwen2, Gemma: the tied or untied
`ReversibleEmbedding` head) `chunked_causal_lm(lm)` builds it.

The wrapper shares the model's layers: training it trains the model, and
the model itself still predicts and generates as before.
"""

from __future__ import annotations

import keras
from keras import ops

# How `chunked_sparse_cross_entropy` reduces the weighted token losses (the
# Keras loss reductions of the same names).
REDUCTIONS = ("sum_over_batch_size", "sum")


def chunk_bounds(length: int, num_chunks: int) -> list[tuple[int, int]]:
    """`num_chunks` contiguous (start, stop) ranges covering `length` items.

    The first `length % num_chunks` chunks are one item longer; with fewer
    items than chunks, each item is its own chunk.

    >>> chunk_bounds(10, 4)
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    num_chunks = max(1, min(num_chunks, length))
    size, extra = divmod(length, num_chunks)
    bounds, start = [], 0
    for i in range(num_chunks):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def chunked_sparse_cross_entropy(
    hidden_states,
    labels,
    head,
    num_chunks: int = 8,
    sample_weight=None,
    remat: bool = True,
    reduction: str = "sum_over_batch_size",
):
    """Mean token cross-entropy of `head(hidden_states)` against `labels`,
    computed one chunk of sequence positions at a time.

    Equals `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`
    (reduction "sum_over_batch_size": weighted losses summed, divided by
    the number of tokens) on the full logits, within float tolerance.

    Args:
        hidden_states: (batch, seq, hidden) tensor.
        labels: (batch, seq) integer token ids.
        head: callable mapping a (batch, chunk, hidden) tensor to
            (batch, chunk, vocabulary) logits.
        num_chunks: how many pieces the sequence axis is cut into; the
            logits of one piece exist at a time.
        sample_weight: optional (batch, seq) weights (e.g. a padding mask).
        remat: recompute each chunk's logits in the backward pass
            (`keras.remat`); without it autodiff keeps every chunk's.
        reduction: "sum_over_batch_size" (the weighted losses' sum over
            the number of tokens) or "sum" (the sum alone: weights already
            normalised, e.g. divided by each batch's count of label tokens).

    Returns:
        A float32 scalar.

    Raises:
        ValueError: if `num_chunks` < 1, the shapes disagree or the
            reduction is another.

    >>> import numpy as np
    >>> h = np.ones((2, 6, 4), "float32")
    >>> kernel = np.zeros((4, 10), "float32")
    >>> y = np.zeros((2, 6), "int32")
    >>> loss = chunked_sparse_cross_entropy(h, y, lambda x: x @ kernel, 3)
    >>> round(float(loss), 4)  # uniform logits: log(10)
    2.3026
    >>> w = np.zeros((2, 6), "float32")
    >>> w[0, 0] = 1.0  # one token, weight 1: "sum" gives its loss alone
    >>> loss = chunked_sparse_cross_entropy(
    ...     h, y, lambda x: x @ kernel, 3, sample_weight=w, reduction="sum")
    >>> round(float(loss), 4)
    2.3026
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}.")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}."
        )
    if len(hidden_states.shape) != 3 or len(labels.shape) != 2:
        raise ValueError(
            "chunked_sparse_cross_entropy expects hidden states (batch, seq, "
            f"hidden) and labels (batch, seq); got {tuple(hidden_states.shape)} "
            f"and {tuple(labels.shape)}."
        )
    labels = ops.convert_to_tensor(labels)
    if sample_weight is None:
        weights = ops.ones(ops.shape(labels), dtype="float32")
    else:
        weights = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
        weights = ops.broadcast_to(weights, ops.shape(labels))

    def chunk_loss(h, y, w):
        logits = ops.cast(head(h), "float32")
        losses = ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return ops.sum(ops.multiply(losses, w))

    def reduce(total):
        if reduction == "sum":
            return total
        return ops.divide(total, ops.cast(ops.size(labels), "float32"))

    seq = hidden_states.shape[1]
    if remat and keras.backend.backend() == "jax" and seq and seq % num_chunks == 0:
        return reduce(
            _scanned_jax(chunk_loss, hidden_states, labels, weights, num_chunks)
        )
    if remat:
        chunk_loss = keras.remat(chunk_loss)
    if seq is None:
        # A dynamic sequence length (a TensorFlow graph traced without it):
        # equal pieces, which `ops.split` checks at run time.
        pieces = zip(
            ops.split(hidden_states, num_chunks, axis=1),
            ops.split(labels, num_chunks, axis=1),
            ops.split(weights, num_chunks, axis=1),
            strict=True,
        )
    else:
        pieces = (
            (hidden_states[:, a:b], labels[:, a:b], weights[:, a:b])
            for a, b in chunk_bounds(seq, num_chunks)
        )
    total = None
    for h, y, w in pieces:
        part = chunk_loss(h, y, w)
        total = part if total is None else ops.add(total, part)
    return reduce(total)


def _scanned_jax(chunk_loss, hidden_states, labels, weights, num_chunks):
    """The summed loss of equal chunks as a `lax.scan` over a checkpointed
    body: the backward pass is a loop, so one chunk's logits exist at a
    time. Unrolled chunks under `jax.checkpoint` do not give that on XLA's
    CPU backend, whose scheduler recomputes them all at once (GPT-2 base,
    8 chunks: 7 chunks' logit gradients live together, 0.18 GB).
    """
    import jax

    def pieces(x):
        # (batch, seq, ...) -> (chunks, batch, seq / chunks, ...)
        x = ops.reshape(x, (x.shape[0], num_chunks, -1, *x.shape[2:]))
        return ops.moveaxis(x, 1, 0)

    def body(total, piece):
        return total + chunk_loss(*piece), None

    xs = (pieces(hidden_states), pieces(labels), pieces(weights))
    total, _ = jax.lax.scan(jax.checkpoint(body), ops.zeros((), "float32"), xs)
    return total


class ChunkedCausalLM(keras.Model):
    """Trains a causal LM with `chunked_sparse_cross_entropy` as its loss.

    Its `call` returns the hidden states; `compute_loss` applies `head`
    chunk by chunk. Compile it with an optimizer only (a `loss` given to
    `compile` is refused: this model computes its own) and `fit` it on the
    model's inputs and next-token labels, with an optional sample weight,
    on any backend.

    Args:
        hidden: layer or model mapping inputs to (batch, seq, hidden).
        head: layer mapping hidden states to logits.
        head_kwargs: keyword arguments of each `head` call (e.g.
            `{"reverse": True}` for a tied `ReversibleEmbedding`).
        num_chunks: pieces of the sequence axis (see
            `chunked_sparse_cross_entropy`).
        remat: recompute each chunk's logits in the backward pass.
        reduction: "sum_over_batch_size" or "sum" (see
            `chunked_sparse_cross_entropy`).
    """

    def __init__(
        self,
        hidden,
        head,
        head_kwargs: dict | None = None,
        num_chunks: int = 8,
        remat: bool = True,
        reduction: str = "sum_over_batch_size",
        **kwargs,
    ):
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be at least 1, got {num_chunks}.")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}."
            )
        super().__init__(**kwargs)
        self.hidden = hidden
        self.head = head
        self.head_kwargs = dict(head_kwargs or {})
        self.num_chunks = int(num_chunks)
        self.chunk_remat = bool(remat)
        self.reduction = reduction

    def call(self, inputs, training=None):
        return self.hidden(inputs, training=training)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        if loss is not None:
            raise ValueError(
                "ChunkedCausalLM computes its own loss (chunked sparse "
                "cross-entropy); compile it with an optimizer only, e.g. "
                "`model.compile(optimizer='adam')`."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = chunked_sparse_cross_entropy(
            y_pred,
            y,
            lambda h: self.head(h, **self.head_kwargs),
            self.num_chunks,
            sample_weight=sample_weight,
            remat=self.chunk_remat,
            reduction=self.reduction,
        )
        if self.losses:
            loss = ops.add(loss, ops.sum(self.losses))
        return loss


def chunked_causal_lm(
    lm: keras.Model,
    num_chunks: int = 8,
    remat: bool = True,
    reduction: str = "sum_over_batch_size",
) -> ChunkedCausalLM:
    """A `ChunkedCausalLM` over a keras-hub `CausalLM` (shares its layers).

    keras-hub's causal LMs compute their logits as
    `backbone.token_embedding(backbone(inputs), reverse=True)`; this wraps
    exactly that, so training the wrapper trains `lm`.

    Args:
        lm: a model with a `backbone` that has a `token_embedding` layer.
        num_chunks: pieces of the sequence axis.
        remat: recompute each chunk's logits in the backward pass.
        reduction: "sum_over_batch_size" or "sum" (see
            `chunked_sparse_cross_entropy`).

    Returns:
        The wrapper, uncompiled.

    Raises:
        ValueError: if `lm` has no `backbone.token_embedding`.
    """
    backbone = getattr(lm, "backbone", None)
    head = getattr(backbone, "token_embedding", None)
    if head is None:
        raise ValueError(
            f"{type(lm).__name__} has no `backbone.token_embedding`: "
            "chunked_causal_lm wraps keras-hub causal LMs. For another "
            "model, build `ChunkedCausalLM(hidden=..., head=...)` from the "
            "layer giving its hidden states and its output projection."
        )
    return ChunkedCausalLM(
        backbone,
        head,
        {"reverse": True},
        num_chunks=num_chunks,
        remat=remat,
        reduction=reduction,
    )
