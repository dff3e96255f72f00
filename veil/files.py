"""Crash-safe, lock-protected files in a state directory.

The running controller and the ``veil controller`` CLI share the state directory
(CA material, join tokens), and the node CLI shares its own with the ztunnel, so
every read-modify-write happens under an ``flock`` on a sibling ``.lock`` file and
every write is an atomic rename of a fully written, fsynced temporary file.
Secrets are created 0600 from the first byte (``O_CREAT`` with mode 0600), never
chmod-ed afterwards, so there is no window where they are world-readable.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "ensure_private_dir", "exclusive_lock"]


def ensure_private_dir(path: Path) -> Path:
    """Creates ``path`` (and parents) with mode 0700 if missing; returns it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replaces ``path`` with ``data``: readers see the old or the new file, never half.

    The temporary file is created exclusively (a stale one from a crashed writer
    is removed first, and a planted symlink is never followed) with ``mode`` from
    the first byte, fsynced, renamed over ``path``, and the directory is fsynced
    so the rename itself survives a power cut.
    """
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        # O_CREAT honours the umask; fchmod makes the mode exact (e.g. 0644 bundles).
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created 0600 if missing)."""
    ensure_private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)
