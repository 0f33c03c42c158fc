"""`GPUMemoryCallback`: peak accelerator memory during `fit`, on any backend."""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterable

import keras

HOST_DEVICE = "host RSS"
_BYTES_PER_GB = 2**30


class MemoryProbe:
    """Reads (and, where the platform allows, resets) one peak-memory counter.

    Args:
        device: what is measured, e.g. "GPU:0", "cuda:0" or "host RSS".
        read_peak: returns the peak number of bytes since the last reset.
        reset_peak: resets the peak to the current usage, or `None` where the
            platform cannot (JAX has no public reset).
        on_accelerator: whether `device` is accelerator memory.
    """

    def __init__(
        self,
        device: str,
        read_peak: Callable[[], int],
        reset_peak: Callable[[], None] | None = None,
        on_accelerator: bool = True,
    ):
        self.device = device
        self.read_peak = read_peak
        self.reset_peak = reset_peak
        self.on_accelerator = on_accelerator


class GPUMemoryCallback(keras.callbacks.Callback):
    """Records peak accelerator memory at chosen points of `fit`.

    A reading is taken at the start of each epoch (label "epoch 0 start"),
    at the start of each batch in `target_batches` ("batch 5"; batch indices
    restart at 0 every epoch) and at the end of each epoch ("epoch 0 end").
    Each reading appends the peak memory in use so far, in GB (2**30 bytes,
    rounded to 3 decimals), to `memory_usage`, and its label to `labels`.

    The counter depends on the backend:

    - TensorFlow: `tf.config.experimental.get_memory_info("GPU:0")["peak"]`;
    - JAX: `jax.devices()[0].memory_stats()["peak_bytes_in_use"]`;
    - PyTorch: `torch.cuda.max_memory_allocated()`.

    With `reset_peak=True` the peak is reset to the current usage when
    training begins, so the readings cover this `fit` (model weights
    included) and not earlier work in the process. JAX offers no reset:
    there the peak covers the whole process.

    Without an accelerator (or when the backend reports no memory
    statistics, as JAX does on CPU) the callback records the host's peak
    resident memory instead (peak RSS of this process: `VmHWM` on Linux,
    `resource.getrusage` elsewhere), says so once with a warning, and sets
    `device` to "host RSS". On Linux that peak is resettable too. The
    callback never fails a training run: a counter that stops working is
    replaced by the host reading, with a warning.

    Readings happen in `on_train_batch_begin`, so "batch 5" is the peak over
    batches 0 to 4. With `steps_per_execution > 1` Keras calls the batch
    hooks once per execution, so only target batches that start an
    execution are recorded.

    Args:
        target_batches: iterable of non-negative batch indices at which to
            take a reading, e.g. `[5, 10, 25]`. May be empty (readings at
            epoch boundaries only).
        print_stats: print each reading as it is taken.
        reset_peak: reset the peak counter when training begins, where the
            backend can.

    Attributes:
        memory_usage: list of readings, in GB.
        labels: list of labels, one per reading.
        device: what is measured: "GPU:0" (TensorFlow, JAX), "cuda:0"
            (PyTorch), or "host RSS" for the fallback.
        on_accelerator: whether `device` is accelerator memory.

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> callback = GPUMemoryCallback(target_batches=[1, 2])
    >>> x, y = np.ones((8, 4)), np.ones((8, 1))
    >>> _ = model.fit(x, y, batch_size=2, callbacks=[callback], verbose=0)
    >>> callback.labels
    ['epoch 0 start', 'batch 1', 'batch 2', 'epoch 0 end']
    >>> all(value > 0 for value in callback.memory_usage)
    True
    """

    def __init__(
        self,
        target_batches: Iterable[int],
        print_stats: bool = False,
        reset_peak: bool = True,
    ):
        super().__init__()
        self.target_batches = _check_target_batches(target_batches)
        self.print_stats = bool(print_stats)
        self.reset_peak = bool(reset_peak)
        self.memory_usage: list[float] = []
        self.labels: list[str] = []
        self._probe = _detect_probe(keras.backend.backend())
        self._announced = False

    @property
    def device(self) -> str:
        return self._probe.device

    @property
    def on_accelerator(self) -> bool:
        return self._probe.on_accelerator

    @property
    def peak_usage(self) -> float | None:
        """The largest reading so far, in GB (`None` before any reading)."""
        return max(self.memory_usage) if self.memory_usage else None

    def on_train_begin(self, logs=None):
        self._announce()
        if self.reset_peak and self._probe.reset_peak is not None:
            try:
                self._probe.reset_peak()
            except Exception as error:  # A reset is a nicety, never a failure.
                self._probe.reset_peak = None
                warnings.warn(
                    f"GPUMemoryCallback: could not reset the peak of "
                    f"{self.device} ({error}); readings include memory used "
                    "before this fit.",
                    stacklevel=2,
                )

    def on_epoch_begin(self, epoch, logs=None):
        self._record(f"epoch {epoch} start")

    def on_train_batch_begin(self, batch, logs=None):
        if batch in self.target_batches:
            self._record(f"batch {batch}")

    def on_epoch_end(self, epoch, logs=None):
        self._record(f"epoch {epoch} end")

    def _announce(self):
        if self._announced or self._probe.on_accelerator:
            return
        self._announced = True
        warnings.warn(
            "GPUMemoryCallback: no accelerator memory statistics on the "
            f"'{keras.backend.backend()}' backend; recording the host's peak "
            "resident memory (peak RSS of this process) instead. "
            "`memory_usage` is then in GB of host RAM.",
            stacklevel=3,
        )

    def _record(self, label: str) -> None:
        self._announce()
        try:
            peak = self._probe.read_peak()
        except Exception as error:
            # A driver or runtime hiccup must not stop training: switch to the
            # host counter for the rest of the run.
            warnings.warn(
                f"GPUMemoryCallback: reading {self.device} failed ({error}); "
                "recording host peak RSS from now on.",
                stacklevel=2,
            )
            self._probe = host_probe()
            self._announced = True
            peak = self._probe.read_peak()
        value = round(peak / _BYTES_PER_GB, 3)
        self.memory_usage.append(value)
        self.labels.append(label)
        if self.print_stats:
            print(f"{label}: peak memory {value:.3f} GB ({self.device})")


def _check_target_batches(target_batches) -> tuple[int, ...]:
    hint = (
        "`target_batches` must be an iterable of non-negative batch indices, "
        "e.g. target_batches=[5, 10, 25]."
    )
    if isinstance(target_batches, (str, bytes)) or not isinstance(
        target_batches, Iterable
    ):
        if isinstance(target_batches, numbers.Integral):
            hint += f" For one batch, pass [{target_batches}]."
        raise ValueError(f"{hint} Received: target_batches={target_batches!r}")
    batches = tuple(target_batches)
    bad = [
        b
        for b in batches
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0
    ]
    if bad:
        raise ValueError(
            f"{hint} Received: target_batches={batches!r}, with invalid "
            f"entries {bad!r}."
        )
    return tuple(sorted({int(b) for b in batches}))


def _detect_probe(backend: str) -> MemoryProbe:
    """The accelerator counter for `backend`, or the host one."""
    finders = {
        "tensorflow": _tensorflow_probe,
        "jax": _jax_probe,
        "torch": _torch_probe,
    }
    finder = finders.get(backend)
    if finder is not None:
        try:
            probe = finder()
        except Exception:  # A broken driver means no accelerator reading.
            probe = None
        if probe is not None:
            return probe
    return host_probe()


def _tensorflow_probe() -> MemoryProbe | None:
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        return None
    device = "GPU:0"
    tf.config.experimental.get_memory_info(device)  # Fails early if unsupported.
    return MemoryProbe(
        device,
        read_peak=lambda: int(tf.config.experimental.get_memory_info(device)["peak"]),
        reset_peak=lambda: tf.config.experimental.reset_memory_stats(device),
    )


def _jax_probe() -> MemoryProbe | None:
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    # memory_stats() is None where the runtime keeps no statistics.
    stats = device.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return MemoryProbe(
        f"{device.platform.upper()}:{device.id}",
        read_peak=lambda: int(device.memory_stats()["peak_bytes_in_use"]),
        reset_peak=None,  # JAX has no public API to reset the peak.
    )


def _torch_probe() -> MemoryProbe | None:
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    return MemoryProbe(
        f"cuda:{index}",
        read_peak=lambda: int(torch.cuda.max_memory_allocated(index)),
        reset_peak=lambda: torch.cuda.reset_peak_memory_stats(index),
    )


def host_probe() -> MemoryProbe:
    """The host's peak resident memory (peak RSS) of this process.

    Its `reset_peak` is `None` where the peak cannot be reset (anywhere but
    Linux).

    Example:

    >>> probe = host_probe()
    >>> probe.device, probe.on_accelerator, probe.read_peak() > 0
    ('host RSS', False, True)
    """
    return MemoryProbe(
        HOST_DEVICE,
        read_peak=host_peak_rss_bytes,
        reset_peak=reset_host_peak_rss if _can_reset_host_peak() else None,
        on_accelerator=False,
    )


def host_peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes, since the last reset.

    Needs nothing beyond the standard library (psutil is not a dependency):
    Linux keeps the peak as `VmHWM` in /proc/self/status (resettable, see
    `reset_host_peak_rss`); other Unix systems report it through
    `resource.getrusage` (bytes on macOS, KiB elsewhere); Windows through
    `GetProcessMemoryInfo` (`PeakWorkingSetSize`).

    Raises:
        OSError: on a platform that offers none of these.

    Example:

    >>> host_peak_rss_bytes() > 2**20  # A Python process holds > 1 MiB.
    True
    """
    for read in (_proc_status_peak, _getrusage_peak, _windows_peak):
        peak = read()
        if peak is not None:
            return peak
    raise OSError(
        f"Cannot read this process's peak resident memory on {sys.platform}: "
        "no /proc/self/status, resource module or Windows process API."
    )


def _proc_status_peak() -> int | None:
    """`VmHWM` of /proc/self/status (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # Reported in kB.
    except OSError:
        pass
    return None


def _getrusage_peak() -> int | None:
    """`ru_maxrss` of this process (Unix), or None. Not resettable."""
    try:
        import resource
    except ImportError:  # Windows.
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _windows_peak() -> int | None:
    """`PeakWorkingSetSize` of this process (Windows), or None."""
    if sys.platform != "win32":
        return None
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [
            ("cb", wintypes.DWORD),
            ("PageFaultCount", wintypes.DWORD),
            ("PeakWorkingSetSize", ctypes.c_size_t),
            ("WorkingSetSize", ctypes.c_size_t),
            ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
            ("QuotaPagedPoolUsage", ctypes.c_size_t),
            ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
            ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
            ("PagefileUsage", ctypes.c_size_t),
            ("PeakPagefileUsage", ctypes.c_size_t),
        ]

    counters = Counters()
    counters.cb = ctypes.sizeof(Counters)
    process = ctypes.windll.kernel32.GetCurrentProcess()
    if not ctypes.windll.psapi.GetProcessMemoryInfo(
        process, ctypes.byref(counters), counters.cb
    ):
        return None
    return int(counters.PeakWorkingSetSize)


def reset_host_peak_rss() -> None:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0).

    Raises:
        OSError: where /proc/self/clear_refs is missing or not writable
            (check `host_probe().reset_peak is not None` first).
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        # "5" resets only the peak ("hiwater") RSS; it touches no page.
        clear_refs.write("5")


def _can_reset_host_peak() -> bool:
    return sys.platform.startswith("linux") and os.access(
        "/proc/self/clear_refs", os.W_OK
    )
