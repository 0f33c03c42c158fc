"""Writing files so that an interrupted write never leaves a broken one."""

from __future__ import annotations

import os
import tempfile


def atomic_write(final_path: str, data: bytes) -> None:
    """Write `data` to `final_path` so that readers see the old file or the
    whole new one, never a part: write a temporary file in the same
    directory, flush it to disk, then rename it over `final_path`.

    Args:
        final_path: the file to write; its directory must exist.
        data: the complete contents.

    Raises:
        OSError: if the directory is missing or the write fails; the old
            file (if any) is then untouched and no temporary file is left.

    Example:

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "note.txt")
    >>> atomic_write(path, b"hello")
    >>> with open(path, "rb") as f:
    ...     f.read()
    b'hello'
    """
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
