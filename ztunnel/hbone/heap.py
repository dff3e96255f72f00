"""Giving memory freed by closed connections back to the operating system.

Each HBONE connection allocates native memory (OpenSSL's record buffers and
session state, transport buffers) on top of its Python objects. When
connections close, glibc keeps the freed chunks in its arenas; under churn the
free space fragments, is reused poorly, and RSS climbs round after round
(measured: 182 -> 259 -> 318 -> 368 -> 404 MiB over five rounds of 1,000
connections, with no Python object left behind; ``malloc_trim(0)`` after each
round held it at 79 MiB). So it is not a leak, but it looks like one to every
memory limit and alert.

:class:`HeapTrimmer` counts closed connections and, once enough have closed,
calls ``malloc_trim(0)`` shortly after the burst (one call per burst; the
count keeps it rare, a trim of a few hundred MiB takes milliseconds). Where the C library has no ``malloc_trim`` (musl),
it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

__all__ = ["HeapTrimmer", "malloc_trim"]

log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


_TRIM = _load_trim()


def malloc_trim() -> bool:
    """Return free heap memory to the OS; False when the C library cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class HeapTrimmer:
    """Trims the heap after every ``after_closes`` closed connections (0: never)."""

    def __init__(self, after_closes: int, delay: float) -> None:
        self._after = after_closes
        self._delay = delay
        self._closed = 0
        self._pending: asyncio.TimerHandle | None = None
        self.trims = 0

    def connection_closed(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._after <= 0 or _TRIM is None:
            return
        self._closed += 1
        if self._closed < self._after or self._pending is not None:
            return
        # After the burst, not inside it: trimming while connections are still
        # closing would only hand back memory the next ones take again.
        self._pending = loop.call_later(self._delay, self._trim)

    def _trim(self) -> None:
        self._pending = None
        self._closed = 0
        malloc_trim()
        self.trims += 1
        log.debug("hbone: returned freed heap memory to the system")

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
