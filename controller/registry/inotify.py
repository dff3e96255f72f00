"""A minimal Linux inotify watch on one directory, to wake the registry watcher early.

Only a hint: the watcher still polls, so a missed or unsupported event (another
OS, a network filesystem, the inotify watch limit reached) costs at most one
poll interval. Events for the directory's entries (a file closed after
writing, renamed in or out, created or deleted) make :meth:`DirectoryEvents.wait`
return; what changed is then found by the watcher's normal stat-and-hash check.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

__all__ = ["DirectoryEvents"]

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_ATTRIB = 0x00000004
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_MASK = (
    _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


class DirectoryEvents:
    """Wakes a task when something in ``directory`` changes. Create with :meth:`open`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    @classmethod
    def open(cls, directory: Path) -> DirectoryEvents | None:
        """An event source for ``directory``, or None where inotify is unavailable."""
        libc = _libc()
        if libc is None or not hasattr(libc, "inotify_init1"):
            return None
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return None
        wd = libc.inotify_add_watch(fd, os.fsencode(directory), _MASK)
        if wd < 0:
            os.close(fd)
            return None
        return cls(fd)

    def _readable(self) -> None:
        # The events themselves are not needed, only that there were some.
        while True:
            try:
                if not os.read(self._fd, 65536):
                    break
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EINTR:
                    break
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True when an event arrived within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        self._event.clear()
        return True

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
