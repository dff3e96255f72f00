"""An in-process byte pipe between an HBONE stream and the waypoint's HTTP code.

The HBONE library relays a tunnel to a local transport (:func:`ztunnel.hbone.relay`),
and the HTTP code reads and writes asyncio streams. Joining the two with a
socket pair cost four system calls and an event-loop wake-up each way per
message; :func:`stream_pipe` joins them in memory instead: what one end
writes is handed to the other end's protocol at once, unless that end paused
reading, in which case it waits in the end's inbox and the writer is told to
pause above the high-water mark (the flow control a socket's buffers give).

Semantics follow a TCP socket pair closely enough for both users:
``write_eof`` is a FIN (the peer's ``eof_received``; if that returns false,
the peer closes too), ``close`` sends EOF and then ends the transport,
``abort`` is a reset (the peer's ``connection_lost`` gets
:class:`ConnectionResetError`), and writing to a peer that closed is a broken
pipe.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

__all__ = ["PipeEnd", "stream_pipe"]

_HIGH = 256 * 1024
_LOW = 64 * 1024
_LIMIT = 256 * 1024  # StreamReader limit on the HTTP side


class PipeEnd(asyncio.Transport):
    """One end of an in-memory pipe; a transport whose peer is the other end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, *, paused: bool = False) -> None:
        super().__init__()
        self._loop = loop
        self._name = name
        self._peer: PipeEnd | None = None
        self._protocol: asyncio.BaseProtocol | None = None
        self._closing = False
        self._lost = False
        self._eof_sent = False
        # An end created paused keeps what it receives until its protocol is
        # attached and calls resume_reading().
        self._reading_paused = paused
        self._draining = False
        self._inbox: deque[bytes | None] = deque()  # None: EOF
        self._inbox_size = 0
        self._writer_paused = False  # we told our protocol to pause writing
        self._high = _HIGH
        self._low = _LOW

    # -- asyncio.Transport -------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("pipe", self._name) if name in ("peername", "sockname") else default

    def is_closing(self) -> bool:
        return self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._inbox and not self._draining:
                self._draining = True
                self._loop.call_soon(self._drain)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = _HIGH if high is None else high
        self._low = min(self._high, (self._high // 4) if low is None else low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        peer = self._peer
        return peer._inbox_size if peer is not None else 0

    def can_write_eof(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing or self._eof_sent:
            return
        peer = self._peer
        if peer is None or peer._closing:
            self._fail(BrokenPipeError("the other end of the pipe is closed"))
            return
        peer._receive(data)
        if not self._writer_paused and peer._inbox_size > self._high:
            self._writer_paused = True
            proto = self._protocol
            if isinstance(proto, asyncio.Protocol | asyncio.BufferedProtocol):
                proto.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        if not self._closing:
            self._send_eof()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True  # first: the peer's answer to our EOF must not come back
        self._send_eof()
        self._inbox.clear()
        self._inbox_size = 0
        self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._inbox.clear()
        self._inbox_size = 0
        peer = self._peer
        if peer is not None:
            peer._fail(ConnectionResetError("the other end of the pipe reset the connection"))
        self._loop.call_soon(self._connection_lost, None)

    # -- internals ---------------------------------------------------------------

    def _send_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        peer = self._peer
        if peer is not None and not peer._closing:
            peer._receive(None)

    def _receive(self, item: bytes | bytearray | memoryview | None) -> None:
        if self._reading_paused or self._inbox or self._draining:
            self._inbox.append(bytes(item) if item is not None else None)
            self._inbox_size += len(item) if item is not None else 0
            return
        self._deliver(item)

    def _deliver(self, item: bytes | bytearray | memoryview | None) -> None:
        proto = self._protocol
        if proto is None or self._closing:
            return
        if item is None:
            keep_open = (
                isinstance(proto, asyncio.Protocol | asyncio.BufferedProtocol)
                and proto.eof_received()
            )
            if not keep_open:
                self.close()
            return
        if isinstance(proto, asyncio.BufferedProtocol):
            view = memoryview(item)
            while view:
                buf = memoryview(proto.get_buffer(len(view)))
                n = min(len(buf), len(view))
                if n == 0:
                    raise RuntimeError("a buffered protocol offered an empty buffer")
                buf[:n] = view[:n]
                proto.buffer_updated(n)
                view = view[n:]
        elif isinstance(proto, asyncio.Protocol):
            proto.data_received(bytes(item))

    def _drain(self) -> None:
        self._draining = False
        while self._inbox and not self._reading_paused and not self._closing:
            item = self._inbox.popleft()
            if item is not None:
                self._inbox_size -= len(item)
            self._deliver(item)
        peer = self._peer
        if peer is not None and peer._writer_paused and self._inbox_size <= peer._low:
            peer._writer_paused = False
            proto = peer._protocol
            if isinstance(proto, asyncio.Protocol | asyncio.BufferedProtocol):
                proto.resume_writing()

    def _fail(self, exc: Exception) -> None:
        if self._closing:
            return
        self._closing = True
        self._inbox.clear()
        self._inbox_size = 0
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        proto = self._protocol
        if proto is not None:
            proto.connection_lost(exc)


def stream_pipe(
    name: str = "tunnel",
) -> tuple[PipeEnd, asyncio.StreamReader, asyncio.StreamWriter]:
    """``(tunnel_end, reader, writer)``: hand ``tunnel_end`` to ``relay()``, use the streams."""
    loop = asyncio.get_running_loop()
    a, b = PipeEnd(loop, name, paused=True), PipeEnd(loop, name)
    a._peer, b._peer = b, a
    reader = asyncio.StreamReader(limit=_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    b.set_protocol(protocol)
    protocol.connection_made(b)
    writer = asyncio.StreamWriter(b, protocol, reader, loop)
    return a, reader, writer
