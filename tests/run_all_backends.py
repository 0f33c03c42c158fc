"""Run the test suite once per Keras backend, each in its own process.

A backend is fixed when Keras is first imported, so one pytest process runs
per backend. The three run at the same time (most of a test is Python and
single-threaded compilation, so on a 2-core machine this takes about 65%
of the serial time); `--serial` runs them one after another. Each
backend's output is printed whole when it ends.

Usage: `python tests/run_all_backends.py [--serial] [pytest args...]`.
Exits non-zero if any backend fails; the last line sums all three runs.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

BACKENDS = ("tensorflow", "jax", "torch")
# The slowest tests of each backend, in its output: where time goes.
DEFAULT_ARGS = ["-q", "-p", "no:cacheprovider", "--durations=10"]


def start(backend: str, args: list[str], log) -> subprocess.Popen:
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", *DEFAULT_ARGS, *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def main() -> int:
    args = sys.argv[1:]
    serial = "--serial" in args
    args = [a for a in args if a != "--serial"]
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed_backends = []
    with tempfile.TemporaryDirectory() as tmp:
        runs, ended = [], {}
        for backend in BACKENDS:
            log = open(os.path.join(tmp, f"{backend}.log"), "w+")
            runs.append((backend, log, start(backend, args, log), time.time()))
            if serial:
                runs[-1][2].wait()
                ended[backend] = time.time()
        while len(ended) < len(runs):  # Note when each ends, for its time.
            for backend, _, proc, _ in runs:
                if backend not in ended and proc.poll() is not None:
                    ended[backend] = time.time()
            time.sleep(0.5)
        for backend, log, proc, began in runs:
            minutes = (ended[backend] - began) / 60
            log.seek(0)
            output = log.read()
            log.close()
            print(f"\n===== KERAS_BACKEND={backend} ({minutes:.1f} min) =====")
            print(output, flush=True)
            lines = output.strip().splitlines()
            tail = lines[-1] if lines else ""
            for count, word in re.findall(
                r"(\d+) (passed|failed|skipped|errors?)", tail
            ):
                totals["error" if word.startswith("error") else word] += int(count)
            if proc.returncode != 0:
                failed_backends.append(f"{backend} (exit {proc.returncode})")
    if failed_backends:
        print("backends with failures: " + ", ".join(failed_backends))
    failed = totals["failed"] + totals["error"]
    print(
        f"total: {totals['passed']} passed, {failed} failed"
        + (f", {totals['skipped']} skipped" if totals["skipped"] else "")
    )
    return 1 if failed_backends else 0


if __name__ == "__main__":
    sys.exit(main())
