"""One end of the supervisor <-> worker socket: framed sends and receives.

Both ends use :class:`FrameLink` over an anonymous ``socketpair`` (no path on
disk, so nothing but the two processes can reach it). Sends are queued on the
stream writer in order; :meth:`FrameLink.frames` yields decoded frames until
EOF and raises :class:`~ztunnel.workers.codec.IpcError` on garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from .codec import Frame, FrameDecoder

__all__ = ["FrameLink"]

_READ = 1 << 16


class FrameLink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder()
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket) -> FrameLink:
        reader, writer = await asyncio.open_connection(sock=sock, limit=_READ)
        return cls(reader, writer)

    def send(self, frame: bytes) -> None:
        """Queues one encoded frame; silently dropped once the link closed."""
        if self.closed or self._writer.is_closing():
            return
        self._writer.write(frame)

    async def flush(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.drain()

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            try:
                data = await self._reader.read(_READ)
            except (ConnectionError, OSError):
                return
            if not data:
                return
            for frame in self._decoder.feed(data):
                yield frame

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()
