"""Writing files so that an interrupted write never leaves a broken one."""

from __future__ import annotations

import os
import tempfile


def atomic_write(final_path: str, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename."""
    directory = os.path.dirname(final_path) or "."
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, final_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
