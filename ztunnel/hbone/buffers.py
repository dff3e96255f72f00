"""Read buffers shared by every connection of a thread, reused without copies.

A ``BufferedProtocol`` reads into the buffer it returns from ``get_buffer``. The
HBONE relay hands slices of that buffer straight to the other side's
``transport.write`` (no per-chunk copy), and consumes every byte before the
callback returns. So one buffer per thread serves every connection, and an idle
connection costs no buffer memory at all.

The one catch: a transport that cannot send at once may keep the slice it was
given (uvloop does). :meth:`ReadBuffer.view` detects that cheaply - a
``bytearray`` with live exports refuses to resize - and switches to a fresh
buffer, leaving the old one to whoever still holds a piece of it.
"""

from __future__ import annotations

import threading

__all__ = ["ReadBuffer", "shared_buffer"]


class ReadBuffer:
    """A reusable read buffer that is replaced while anything still references it."""

    __slots__ = ("_buf", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._buf = bytearray(size)

    def view(self) -> memoryview:
        buf = self._buf
        try:
            buf.append(0)  # raises BufferError while a slice handed out is still alive
            del buf[-1]
        except BufferError:
            buf = self._buf = bytearray(self._size)
        return memoryview(buf)

    @property
    def size(self) -> int:
        return self._size


_local = threading.local()


def shared_buffer(size: int) -> ReadBuffer:
    """The calling thread's buffer of ``size`` bytes (event loops are per thread)."""
    buffers: dict[int, ReadBuffer] | None = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(size)
    if buf is None:
        buf = buffers[size] = ReadBuffer(size)
    return buf
