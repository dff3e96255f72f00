"""A minimal Linux inotify watch on one directory: wakes the registry watcher, tracks open writes.

Wake-ups are only a hint: the watcher still polls, so a missed or unsupported
event (another OS, a network filesystem, the inotify watch limit reached) costs
at most one poll interval. Completed changes to the directory's entries (a file
closed after writing, renamed in or out, created or deleted, its attributes
changed) make :meth:`DirectoryEvents.wait` return; what changed is then found by
the watcher's normal stat-and-hash check.

The events also say which files are being written right now: a file modified
(IN_MODIFY, which a truncation also raises) and not yet closed
(IN_CLOSE_WRITE) is half-written, whatever the poll may see of it.
:meth:`DirectoryEvents.last_open_write` tells the watcher to leave it alone.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import struct
import time
from pathlib import Path

__all__ = ["DirectoryEvents"]

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_MODIFY = 0x00000002
_IN_ATTRIB = 0x00000004
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_Q_OVERFLOW = 0x00004000
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
# Events that end a write, or replace or remove the file: a file is no longer
# being written after any of them.
_WRITE_DONE = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_MOVED_FROM | _IN_DELETE
_WAKE = _WRITE_DONE | _IN_ATTRIB | _IN_CREATE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_Q_OVERFLOW
_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
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
        self._writing: dict[str, float] = {}  # entry name -> monotonic time of the last write
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
        wake = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                break
            if not data:
                break
            wake = self._consume(data) or wake
        if wake:
            self._event.set()

    def _consume(self, data: bytes) -> bool:
        """Updates the set of files being written; True when the watcher should look now."""
        wake = False
        offset = 0
        now = time.monotonic()
        while offset + _EVENT_HEADER.size <= len(data):
            _, mask, _, length = _EVENT_HEADER.unpack_from(data, offset)
            start = offset + _EVENT_HEADER.size
            name = os.fsdecode(data[start : start + length].rstrip(b"\0"))
            offset = start + length
            if mask & _IN_Q_OVERFLOW:
                self._writing.clear()  # events were lost: nothing is known to be open
            elif mask & _WRITE_DONE:
                self._writing.pop(name, None)
            elif mask & _IN_MODIFY:
                self._writing[name] = now
            if mask & _WAKE:
                wake = True
        return wake

    def last_open_write(self, names: list[str]) -> float | None:
        """When one of ``names`` was last modified, if it has not been closed since; else None."""
        times = [self._writing[n] for n in names if n in self._writing]
        return max(times) if times else None

    async def wait(self, timeout: float) -> bool:
        """True when an event arrived within ``timeout`` seconds."""
        if not self._event.is_set():
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that lands as the event fires, and the watcher task
            # would then never stop.
            waiter = asyncio.ensure_future(self._event.wait())
            try:
                done, _ = await asyncio.wait({waiter}, timeout=timeout)
            finally:
                waiter.cancel()
            if not done:
                return False
        self._event.clear()
        return True

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
