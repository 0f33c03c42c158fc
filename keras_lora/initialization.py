"""How a LoRA adapter's factors start: `init="kaiming"`, `"gaussian"`,
`"pissa"`, `"pissa_niter_K"` or `"olora"` (PEFT's `init_lora_weights`).

Every initialiser works on the kernel as one (fan_in, fan_out) matrix K,
flattened through the layer's `KernelSplit`, so any Dense or EinsumDense
equation is handled alike. The forward pass is `x·K + s·x·A·B` (A is
(fan_in, r), B is (r, fan_out), `s` the scale): PEFT's `W` (out, in) is
K transposed, its `lora_A` is A transposed and its `lora_B` is B
transposed.

- kaiming: A uniform in ±1/sqrt(fan_in) (PEFT's kaiming_uniform(a=√5)),
  B = 0.
- gaussian: A ~ N(0, (1/r)²) (PEFT: `normal_(std=1 / r)`), B = 0.
- pissa: K = U·diag(S)·Vh; A = U_r·sqrt(S_r / s), B = sqrt(S_r / s)·Vh_r,
  and the kernel becomes the residual K − s·A·B (PEFT's `pissa_init`).
  `"pissa_niter_K"` takes the top-r singular triplets from a randomised SVD
  with K subspace iterations (as `torch.svd_lowrank`; seeded by `seed`, 0
  when it is `None`, so a run is repeatable).
- olora: Kᵀ = Q·R; A = R_rᵀ, B = Q_rᵀ (PEFT's `olora_init`, no division
  by the scale), and the kernel becomes K − s·A·B.

PiSSA and OLoRA rewrite the frozen kernel, so the layer keeps the initial
factors A0, B0 as two frozen float32 variables (`initial_a`, `initial_b`,
2·r·(fan_in + fan_out) numbers): the original kernel is exactly
`residual + s·A0·B0`, which lets the layer

- compute the base model while the adapter is inactive or LoRA is
  disabled (`disable_lora`, `set_adapter`, `adapter_batch` rows of `None`),
- put the original kernel back when the adapter is deleted or left out of
  a merge,
- save and export the adapter for the ORIGINAL base weights as PEFT
  converts PiSSA/OLoRA: ΔW = s·A·B − s·A0·B0 is one LoRA of rank 2r,
  A' = [A, A0], B' = [B; −B0], with alpha doubled (×√2 under rsLoRA) so
  the scale stays `s` (`ResidualKernel.factors_for_original_kernel`).

Such an adapter must be the only one on its layers: a second adapter would
see the residual kernel, not the base, and nothing exact could be saved
for it. The decomposition runs in float64 on the host and the residual is
rounded once into the kernel's dtype: with a float32 kernel the model at
init equals the base to float32 rounding; a bfloat16/float16 kernel adds
that dtype's rounding of the residual, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras
import numpy as np
from keras import ops

from keras_lora.kernel_split import KernelSplit
from keras_lora.low_rank import delta, project
from keras_lora.quantized import quantization_mode

# The `init` names, for messages; "pissa_niter_K" stands for any K >= 0.
INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init(init) -> str:
    """Raise `ValueError` unless `init` names a known initialisation.

    Example:

    >>> check_init("pissa_niter_4")
    'pissa_niter_4'
    >>> check_init("loftq")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Unknown `init` 'loftq'. Known: 'kaiming', 'gaussian', ...
    """
    fixed = ("kaiming", "gaussian", "pissa", "olora")
    if isinstance(init, str) and (init in fixed or _PISSA_NITER.fullmatch(init)):
        return init
    known = ", ".join(
        f"'{name}'"
        + (" (K subspace iterations, e.g. 'pissa_niter_4')" if "_K" in name else "")
        for name in INITS
    )
    raise ValueError(f"Unknown `init` {init!r}. Known: {known}.")


def rewrites_kernel(init: str) -> bool:
    """Whether `init` moves part of the kernel into the factors (PiSSA, OLoRA)."""
    return init == "olora" or init.startswith("pissa")


def check_layer_init(layer: keras.layers.Layer, split: KernelSplit, init, rank) -> None:
    """Raise `ValueError` if `layer` (not wrapped yet) cannot start with `init`.

    Checked before any layer changes: PiSSA/OLoRA need a float kernel (PEFT
    asks to quantize the residual afterwards, not to decompose a quantized
    kernel) and a rank no larger than the kernel's smaller side.
    """
    init = check_init(init)
    if not rewrites_kernel(init):
        return
    mode = quantization_mode(layer)
    if mode is not None:
        raise ValueError(
            f"Layer '{layer.name}' is quantized ({mode}); init={init!r} needs "
            "the float kernel to decompose. Add the adapter to the float "
            "model, then quantize it (its kernel is then the residual, as "
            "PEFT recommends), or use init='kaiming' or 'gaussian'."
        )
    dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
    if dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise ValueError(
            f"Layer '{layer.name}' has a {dtype} kernel; init={init!r} needs a "
            "floating-point kernel."
        )
    if rank > min(split.fan_in, split.fan_out):
        raise ValueError(
            f"init={init!r} takes the top {rank} directions of layer "
            f"'{layer.name}''s kernel, a {split.fan_in} x {split.fan_out} "
            f"matrix: rank must be at most {min(split.fan_in, split.fan_out)}."
        )


def a_initializer(init: str, fan_in: int, rank: int, seed) -> keras.Initializer:
    """The Keras initializer of A (PiSSA/OLoRA overwrite it afterwards)."""
    if init == "gaussian":
        return keras.initializers.RandomNormal(stddev=1.0 / rank, seed=seed)
    # kaiming_uniform(a=sqrt(5)) on a (rank, fan_in) matrix, as PEFT and the
    # reference implementation initialise A.
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound, seed)


def decompose(
    kernel: np.ndarray, init: str, rank: int, scale: float, seed=None
) -> tuple[np.ndarray, np.ndarray]:
    """The initial (A, B) of a PiSSA/OLoRA adapter, in float64.

    Args:
        kernel: the (fan_in, fan_out) kernel matrix.
        init: "pissa", "pissa_niter_K" or "olora".
        rank: the adapter's rank.
        scale: the adapter's scale `s`.
        seed: seed of the randomised SVD ("pissa_niter_K" only).

    Returns:
        A (fan_in, rank) and B (rank, fan_out); the residual kernel is
        `kernel - scale * A @ B`.

    Example (a rank-1 kernel is all principal part):

    >>> k = np.outer([1.0, 2.0], [3.0, 0.0, 4.0])
    >>> a, b = decompose(k, "pissa", rank=1, scale=2.0)
    >>> bool(np.allclose(2.0 * a @ b, k))
    True
    """
    w = np.asarray(kernel, "float64")
    if init == "olora":
        q, r = np.linalg.qr(w.T)  # PEFT decomposes W = Kᵀ (out, in).
        return r[:rank].T, q[:, :rank].T
    match = _PISSA_NITER.fullmatch(init)
    if match:
        u, s, vh = _randomised_svd(w, rank, int(match[1]), seed)
    else:
        u, s, vh = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:rank] / scale)
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _randomised_svd(w, rank, niter, seed):
    """Halko et al.'s randomised SVD with `niter` subspace iterations: the
    algorithm of `torch.svd_lowrank(w, q=rank, niter=niter)` (PEFT's
    `pissa_niter_K`)."""
    rng = np.random.default_rng(0 if seed is None else seed)
    q = np.linalg.qr(w @ rng.standard_normal((w.shape[1], rank)))[0]
    for _ in range(niter):
        q = np.linalg.qr(w.T @ q)[0]
        q = np.linalg.qr(w @ q)[0]
    u, s, vh = np.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u, s, vh


def initialize_from_kernel(layer, adapter) -> ResidualKernel:
    """Give `adapter` (a `keras_lora.adapter_record.Adapter` of `LoraLayer`
    `layer`) its PiSSA/OLoRA factors, keep them as frozen
    `initial_a`/`initial_b`, and write the residual into the wrapped kernel.

    Returns:
        The `ResidualKernel` piece holding the frozen (A0, B0).
    """
    split, kernel = layer.split, layer.original_layer.kernel
    matrix = _flatten(split, ops.convert_to_numpy(ops.cast(kernel, "float32")))
    a, b = decompose(matrix, adapter.init, adapter.rank, adapter.scale, adapter.seed)
    a = a.reshape(split.in_shape + (adapter.rank,))
    b = b.reshape((adapter.rank,) + split.out_shape)
    initial = []
    for name, value in (("initial_a", a), ("initial_b", b)):
        # Created non-trainable and left so: only the live factors train.
        initial.append(
            layer.add_weight(
                name=name,
                shape=value.shape,
                initializer=keras.initializers.Constant(0.0),
                dtype="float32",
                trainable=False,
            )
        )
        initial[-1].assign(value.astype("float32"))
    adapter.lora_a.assign(a.astype("float32"))
    adapter.lora_b.assign(b.astype("float32"))
    # The residual in float64, rounded once into the kernel's dtype.
    update = adapter.scale * np.einsum(
        split.delta_equation(), a.astype("float64"), b.astype("float64")
    )
    residual = ops.convert_to_numpy(ops.cast(kernel, "float32")).astype("float64")
    kernel.assign(ops.cast(residual - update, kernel.dtype))
    return ResidualKernel(initial[0], initial[1], adapter.rank, adapter.scale)


class OriginalKernel:
    """An adapter's `initial` piece when the wrapped kernel is the original
    one (every init but PiSSA/OLoRA): nothing to add back or restore."""

    variables: tuple = ()

    def add_back(self, layer, inputs, outputs, off=None):
        """`outputs` unchanged: the kernel lacks nothing."""
        return outputs

    def delta(self, split: KernelSplit):
        """None: the kernel lacks nothing."""
        return None

    def restore(self, layer, kernel):
        """`kernel` (float32) unchanged."""
        return kernel

    def restore_kernel(self, layer) -> None:
        """Nothing to put back."""

    def factors_for_original_kernel(self, adapter) -> tuple:
        """(A, B, rank, alpha) of `adapter` as numpy: itself."""
        return (
            _numpy(adapter.lora_a),
            _numpy(adapter.lora_b),
            adapter.rank,
            adapter.alpha,
        )


ORIGINAL_KERNEL = OriginalKernel()


@dataclasses.dataclass(eq=False)
class ResidualKernel:
    """A PiSSA/OLoRA adapter's `initial` piece: the frozen initial factors.

    The wrapped kernel is the original minus `scale * A0·B0`; this piece
    adds that update back where the base model is asked for, and converts
    the adapter for the original kernel.

    Args:
        lora_a: A0, the frozen `initial_a` variable.
        lora_b: B0, the frozen `initial_b` variable.
        rank: the adapter's rank.
        scale: the adapter's scale.
    """

    lora_a: keras.Variable
    lora_b: keras.Variable
    rank: int
    scale: float

    @property
    def variables(self) -> tuple:
        return (self.lora_a, self.lora_b)

    def add_back(self, layer, inputs, outputs, off=None):
        """`outputs` plus the initial update, times `off` if given (the
        weight where the adapter is off: `(1,)`, or `(batch, 1)` per row)."""
        columns = self.scale
        if off is not None:
            columns = ops.cast(ops.repeat(off, self.rank, axis=-1) * self.scale,
                               layer.compute_dtype)  # fmt: skip
        return ops.add(outputs, project(layer, inputs, [self], columns))

    def delta(self, split: KernelSplit):
        """`scale * A0·B0` in float32, shaped like the kernel."""
        return delta(split, self)

    def restore(self, layer, kernel):
        """The float32 `kernel` plus the initial update."""
        return ops.add(kernel, self.delta(layer.split))

    def restore_kernel(self, layer) -> None:
        """Add the initial update back into `layer`'s wrapped kernel (the
        original kernel again), before its adapter goes."""
        kernel = layer.original_layer.kernel
        restored = self.restore(layer, ops.cast(kernel, "float32"))
        kernel.assign(ops.cast(restored, kernel.dtype))

    def factors_for_original_kernel(self, adapter) -> tuple:
        """`adapter` as LoRA over the ORIGINAL kernel: (A, B, rank, alpha).

        PEFT's rank-2r conversion: A' = [A, A0], B' = [B; −B0] and alpha
        doubled (×√2 under rsLoRA), so that the scale is unchanged and
        `s·A'·B' = s·A·B − s·A0·B0`, what the residual kernel lacks.
        """
        a, b = _numpy(adapter.lora_a), _numpy(adapter.lora_b)
        a0, b0 = _numpy(self.lora_a), _numpy(self.lora_b)
        alpha = adapter.alpha * (math.sqrt(2.0) if adapter.use_rslora else 2.0)
        return (
            np.concatenate([a, a0], axis=-1),
            np.concatenate([b, -b0], axis=0),
            2 * adapter.rank,
            alpha,
        )


def _flatten(split: KernelSplit, kernel: np.ndarray) -> np.ndarray:
    """The kernel as a (fan_in, fan_out) matrix, whatever its axes' order."""
    order = [split.kernel_spec.index(axis) for axis in split.in_axes + split.out_axes]
    return np.transpose(kernel, order).reshape(split.fan_in, split.fan_out)


def _numpy(variable) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(variable.value), "float32")
