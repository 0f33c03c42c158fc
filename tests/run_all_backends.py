"""Run the test suite once per Keras backend, each in its own process.

A backend is fixed when Keras is first imported, so one pytest process runs
per backend. Usage: `python tests/run_all_backends.py [pytest args...]`.
Exits non-zero if any backend fails; the last line sums all three runs.
"""

import os
import re
import subprocess
import sys

BACKENDS = ("tensorflow", "jax", "torch")


def main() -> int:
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed_backends = []
    for backend in BACKENDS:
        print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
        env = dict(os.environ, KERAS_BACKEND=backend)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            + sys.argv[1:],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        print(proc.stdout, flush=True)
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail):
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
