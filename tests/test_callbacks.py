"""GPUMemoryCallback: labels, values, the host fallback and validation."""

import builtins
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from keras_lora import callbacks as callbacks_module
from keras_lora import inject_lora
from keras_lora.callbacks import GPUMemoryCallback, MemoryProbe
from tests.helpers import constant_token_task, learnable_lm, mlp

# The host-fallback notice is expected on machines without an accelerator.
pytestmark = pytest.mark.filterwarnings("ignore:GPUMemoryCallback. no accelerator")


def fit_mlp(callback, epochs=1, samples=32, batch_size=4):
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 784)).astype("float32")
    y = rng.integers(0, 10, samples)
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, callbacks=[callback], verbose=0
    )
    return callback


def test_labels_and_values_over_two_epochs():
    callback = fit_mlp(GPUMemoryCallback(target_batches=[5, 2, 7, 100]), epochs=2)
    # Batch 100 never happens (8 batches per epoch); batch indices restart
    # each epoch, as in the keras.io example.
    assert callback.labels == [
        "epoch 0 start",
        "batch 2",
        "batch 5",
        "batch 7",
        "epoch 0 end",
        "epoch 1 start",
        "batch 2",
        "batch 5",
        "batch 7",
        "epoch 1 end",
    ]
    assert len(callback.memory_usage) == len(callback.labels)
    for value in callback.memory_usage:
        assert isinstance(value, float) and value > 0
        assert value == round(value, 3)
    assert callback.peak_usage == max(callback.memory_usage)


def test_fit_of_lora_gpt2_records_memory():
    lm = learnable_lm()
    inject_lora(lm, rank=4)
    lm.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y, weights = constant_token_task(batch=8)
    callback = GPUMemoryCallback(target_batches=[1])
    lm.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=4,
        shuffle=False,  # keras-hub feeds tf.data, which Keras does not shuffle.
        callbacks=[callback],
        verbose=0,
    )
    assert callback.labels == ["epoch 0 start", "batch 1", "epoch 0 end"]
    assert all(value > 0 for value in callback.memory_usage)


def test_host_fallback_on_this_machine_warns_once(capsys):
    # The test machines have no accelerator, so every backend falls back.
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        has_accelerator = bool(tf.config.list_logical_devices("GPU"))
    elif keras.config.backend() == "jax":
        import jax

        has_accelerator = jax.devices()[0].platform != "cpu"
    else:
        import torch

        has_accelerator = torch.cuda.is_available()
    if has_accelerator:
        pytest.skip("an accelerator is present; the host fallback is not used")

    callback = GPUMemoryCallback(target_batches=[0, 1], print_stats=True)
    assert callback.device == "host RSS"
    assert not callback.on_accelerator
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_mlp(callback, epochs=2, samples=8)
    fallback = [w for w in caught if "peak resident memory" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("epoch 0 start: peak memory ")
    assert printed[0].endswith(" GB (host RSS)")
    assert len(printed) == len(callback.labels) == 8


def run_fresh(code: str) -> list[int]:
    """Run `code` in a fresh Python process; the integers it printed last.

    Inside the suite the allocator may reuse memory freed by earlier tests,
    so a new array need not raise (or lower) the high-water mark there.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [int(x) for x in proc.stdout.strip().splitlines()[-1].split()]


def test_host_peak_reset_where_supported():
    if not callbacks_module._can_reset_host_peak():
        pytest.skip("this platform cannot reset the peak RSS")
    high, reset = run_fresh(
        "import numpy as np\n"
        "from keras_lora.callbacks import host_peak_rss_bytes, reset_host_peak_rss\n"
        "block = np.ones(384 * 2**20, dtype='uint8')  # Touched: resident.\n"
        "del block  # Large arrays are unmapped at once: RSS drops back.\n"
        "high = host_peak_rss_bytes()\n"
        "reset_host_peak_rss()\n"
        "print(high, host_peak_rss_bytes())\n"
    )
    assert reset <= high - 300 * 2**20, (high, reset)


def test_host_peak_tracks_a_large_allocation_in_a_fresh_process():
    before, after = run_fresh(
        "import numpy as np\n"
        "from keras_lora.callbacks import host_peak_rss_bytes as peak\n"
        "before = peak()\n"
        "block = np.ones(384 * 2**20, dtype='uint8')  # Touched: resident.\n"
        "print(before, peak())\n"
    )
    assert after - before >= 300 * 2**20, (before, after)


class FakeCounter:
    """An accelerator counter: a peak that reset() lowers to `current`."""

    def __init__(self):
        self.current = 3 * 2**30
        self.peak = 5 * 2**30
        self.resets = 0

    def probe(self):
        return MemoryProbe("GPU:0", self.read, self.reset)

    def read(self):
        self.peak = max(self.peak, self.current)
        self.current += 2**29  # Usage grows by 0.5 GB between readings.
        return self.peak

    def reset(self):
        self.resets += 1
        self.peak = self.current


def test_accelerator_counter_is_reset_at_train_begin(monkeypatch):
    counter = FakeCounter()
    monkeypatch.setattr(callbacks_module, "_detect_probe", lambda _: counter.probe())
    callback = GPUMemoryCallback(target_batches=[1])
    assert callback.device == "GPU:0" and callback.on_accelerator
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # No fallback warning on an accelerator.
        fit_mlp(callback, samples=8)
    assert counter.resets == 1
    # Peak reset from 5 GB to the current 3 GB, then growing 0.5 GB a reading.
    assert callback.memory_usage == [3.0, 3.5, 4.0]
    assert callback.labels == ["epoch 0 start", "batch 1", "epoch 0 end"]


def test_reset_peak_false_keeps_the_process_peak(monkeypatch):
    counter = FakeCounter()
    monkeypatch.setattr(callbacks_module, "_detect_probe", lambda _: counter.probe())
    callback = fit_mlp(GPUMemoryCallback([], reset_peak=False), samples=8)
    assert counter.resets == 0
    assert callback.memory_usage == [5.0, 5.0]


def test_failing_counter_falls_back_to_host_without_failing_fit(monkeypatch):
    def broken():
        raise RuntimeError("driver went away")

    monkeypatch.setattr(
        callbacks_module,
        "_detect_probe",
        lambda _: MemoryProbe("GPU:0", broken, broken),
    )
    callback = GPUMemoryCallback(target_batches=[0])
    with pytest.warns(UserWarning, match="driver went away"):
        fit_mlp(callback, samples=8)
    assert callback.device == "host RSS"
    assert callback.labels == ["epoch 0 start", "batch 0", "epoch 0 end"]
    assert all(value > 0 for value in callback.memory_usage)


def test_detect_probe_falls_back_when_finder_raises(monkeypatch):
    def broken_finder():
        raise RuntimeError("no driver")

    monkeypatch.setattr(callbacks_module, "_jax_probe", broken_finder)
    assert callbacks_module._detect_probe("jax").device == "host RSS"
    assert callbacks_module._detect_probe("numpy").device == "host RSS"


@pytest.mark.parametrize(
    "target_batches, match",
    [
        (5, r"For one batch, pass \[5\]"),
        ("5", "iterable of non-negative batch indices"),
        (None, "iterable of non-negative batch indices"),
        ([1, -2], r"invalid entries \[-2\]"),
        ([1.5], r"invalid entries \[1.5\]"),
        ([True], r"invalid entries \[True\]"),
    ],
)
def test_bad_target_batches_raise(target_batches, match):
    with pytest.raises(ValueError, match=match):
        GPUMemoryCallback(target_batches)


def test_target_batches_accepts_any_iterable_of_ints():
    callback = GPUMemoryCallback(b for b in (np.int64(7), 3, 3))
    assert callback.target_batches == (3, 7)
    assert GPUMemoryCallback(range(0)).target_batches == ()


@pytest.fixture
def no_psutil(monkeypatch):
    """`import psutil` fails, as without the dev extra."""
    monkeypatch.setitem(sys.modules, "psutil", None)
    with pytest.raises(ImportError):
        import psutil  # noqa: F401


def block_proc_status(monkeypatch):
    """Reading /proc/self/status fails, as off Linux."""
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).startswith("/proc/self/status"):
            raise FileNotFoundError(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)


def test_host_memory_without_psutil(no_psutil):
    assert callbacks_module.host_peak_rss_bytes() > 2**20
    probe = callbacks_module.host_probe()
    assert probe.device == "host RSS" and probe.read_peak() > 2**20
    callback = GPUMemoryCallback(target_batches=[0])
    callback._probe = probe
    fit_mlp(callback, samples=8)
    assert callback.labels == ["epoch 0 start", "batch 0", "epoch 0 end"]
    assert all(value > 0 for value in callback.memory_usage)


def test_host_peak_from_getrusage_without_proc(no_psutil, monkeypatch):
    resource = pytest.importorskip("resource")
    block_proc_status(monkeypatch)
    peak = callbacks_module.host_peak_rss_bytes()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak == (maxrss if sys.platform == "darwin" else maxrss * 1024)


def test_no_peak_counter_at_all_is_a_clear_error(no_psutil, monkeypatch):
    # No /proc, no resource module, not Windows, no psutil: an OSError that
    # says what is missing (the psutil fallback raised ImportError here).
    block_proc_status(monkeypatch)
    monkeypatch.setitem(sys.modules, "resource", None)
    with pytest.raises(OSError, match="peak resident memory on .*no /proc"):
        callbacks_module.host_peak_rss_bytes()


def test_callbacks_never_import_psutil():
    import ast

    with open(callbacks_module.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "psutil" not in imported
