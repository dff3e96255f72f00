"""Read buffers shared by every connection of a thread, reused without copies.

A ``BufferedProtocol`` reads into the buffer it returns from ``get_buffer``. The
HBONE relay hands slices of that buffer straight to the other side's
``transport.write`` (no per-chunk copy), and consumes every byte before the
callback returns. So a few buffers per thread serve every connection, and an
idle connection costs no buffer memory at all.

The catch: a transport may keep the slice it was given until later in the
event-loop iteration (uvloop queues every write and sends the queue once per
iteration) or until a slow socket drains. A buffer something still references
cannot be reused, so :class:`ReadBuffer` keeps a small pool and hands out the
first buffer nobody references. Only when every pooled buffer is held does it
allocate (and replace one of them, leaving the old one to whoever holds it):
allocating and zeroing 256 KiB - 1 MiB per read costs tens of microseconds,
and freeing such blocks in random order fragments the heap, which shows up as
RSS that never comes back.
"""

from __future__ import annotations

import threading

__all__ = ["ReadBuffer", "shared_buffer"]

POOL_SLOTS = 4  # writes are queued for one loop iteration: a few buffers suffice


class ReadBuffer:
    """Up to :data:`POOL_SLOTS` reusable buffers; one nobody references is handed out."""

    __slots__ = ("_bufs", "_next", "_size", "_slots")

    def __init__(self, size: int, slots: int = POOL_SLOTS) -> None:
        self._size = size
        self._slots = max(1, slots)
        self._bufs: list[bytearray] = [_new(size)]
        self._next = 0  # the slot replaced when every buffer is held

    def view(self) -> memoryview:
        for buf in self._bufs:
            try:
                buf.append(0)  # raises BufferError while a slice handed out is alive
            except BufferError:
                continue
            del buf[-1]
            return memoryview(buf)
        fresh = _new(self._size)
        if len(self._bufs) < self._slots:
            self._bufs.append(fresh)
        else:
            self._bufs[self._next] = fresh
            self._next = (self._next + 1) % self._slots
        return memoryview(fresh)

    @property
    def size(self) -> int:
        return self._size

    @property
    def pooled(self) -> int:
        """Buffers currently kept for reuse."""
        return len(self._bufs)


def _new(size: int) -> bytearray:
    buf = bytearray(size)
    # The first append over-allocates; later append/del pairs (the probe in
    # view()) then never reallocate, which would copy the whole buffer.
    buf.append(0)
    del buf[-1]
    return buf


_local = threading.local()


def shared_buffer(size: int) -> ReadBuffer:
    """The calling thread's buffer pool of ``size`` bytes (event loops are per thread)."""
    buffers: dict[int, ReadBuffer] | None = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(size)
    if buf is None:
        buf = buffers[size] = ReadBuffer(size)
    return buf
