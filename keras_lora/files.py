"""Writing files and directories so that an interrupted write never leaves
a broken one: each is built under a temporary name in its final directory,
then renamed into place, with the permissions `open` and `os.makedirs`
give (`tempfile` makes them private to the user).
"""

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
        os.chmod(tmp_path, _default_mode(0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, final_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def staging_directory(parent: str, prefix: str) -> str:
    """A new empty directory in `parent` to build a directory in before it
    is renamed into place, with the permissions `os.makedirs` would give it.

    Args:
        parent: the directory the result will be renamed within; it must
            exist.
        prefix: the start of the temporary name (".step-00000004-").

    Returns:
        The new directory's path; the caller renames or removes it.

    Example:

    >>> import stat
    >>> path = staging_directory(tempfile.mkdtemp(), ".adapter-")
    >>> stat.S_IMODE(os.stat(path).st_mode) == _default_mode(0o777)
    True
    """
    path = tempfile.mkdtemp(dir=parent, prefix=prefix)
    os.chmod(path, _default_mode(0o777))
    return path


def _default_mode(mode: int) -> int:
    """`mode` less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask
