"""How the proxy carries bytes, and the one result type every relay reports.

:class:`RelayResult` and :class:`Counters` count in client terms
(``from_client`` / ``to_client``) whichever listener accepted the connection;
HBONE streams, which count from their local socket's side, are converted here
and only here (:func:`tunnel_result`, :class:`TunnelCounters`).

:func:`relay_sockets` is the plaintext TCP-to-TCP relay used by the same-node
path, 15006 and passthrough.

Two :class:`asyncio.BufferedProtocol` halves forward each other's bytes:

* Reads land in one 1 MiB buffer shared by every relay on the thread and are
  copied out before the next read. ``get_buffer -> recv_into -> buffer_updated``
  runs without yielding, so sharing is safe, and an idle connection costs no
  buffer memory at all (10,000 parked connections would otherwise pin gigabytes).
  The copy is needed anyway: transports (uvloop, Python 3.12+) may keep a
  reference to the written object until the kernel takes it.
* Backpressure: when one side's write buffer passes its high-water mark the
  transport calls ``pause_writing`` and we stop reading from the other side,
  until ``resume_writing``.
* Half-close: an EOF from one side becomes ``write_eof`` on the other, and the
  relay keeps the opposite direction running until it also ends.
* A reset (or a cancelled relay) resets the other side too, with SO_LINGER 0,
  so neither end mistakes an aborted stream for a complete one.

:func:`relay_until_handover` is the same relay with a watcher
(:mod:`ztunnel.proxy.promotion`) that may end it early: it stops reading both
sides, waits until nothing waits in user space (the write buffers have
drained) and returns the two sockets, still open, for the sk_skb splice or
the splice(2) relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Protocol, cast

from ztunnel.hbone import CloseReason
from ztunnel.hbone import RelayResult as TunnelResult

from .errors import FLAG_DOWNSTREAM_CLOSED, FLAG_UPSTREAM_CLOSED
from .promotion import Interactivity, Promotion

__all__ = [
    "BUFFER_SIZE",
    "ByteCounters",
    "Counters",
    "Handover",
    "RelayResult",
    "TunnelCounters",
    "relay_sockets",
    "relay_until_handover",
    "reset_transport",
    "tunnel_result",
]

# One per thread, so its size costs nothing per connection. 1 MiB against
# 256 KiB: same-node bulk 18.6 against 15.2 Gbit/s, 0.38 against 0.41 CPU s/GB
# (perf/bench_splice.py probe, 3 rounds; 64 KiB gave 9.0 at 0.87).
BUFFER_SIZE = 1024 * 1024
# A peer that stops reading holds at most this much in our write buffer before
# the other side is paused.
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


class _SharedBuffer(threading.local):
    """One read buffer per thread (each thread runs at most one event loop)."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(BUFFER_SIZE))


_BUFFER = _SharedBuffer()


class Counters(Protocol):
    """Live byte counts of one connection, read by the connection registry."""

    @property
    def from_client(self) -> int: ...

    @property
    def to_client(self) -> int: ...


class ByteCounters:
    """Live byte counts a plaintext relay updates as it goes."""

    __slots__ = ("from_client", "to_client")

    def __init__(self) -> None:
        self.from_client = 0
        self.to_client = 0


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a relay ended. ``error`` is None for a clean close in both directions;
    ``flags`` is the response flag to report when the way it ended has one."""

    from_client: int
    to_client: int
    error: str | None = None
    flags: str | None = None


@dataclass(frozen=True, slots=True)
class Handover:
    """Two sockets a relay stopped reading, with nothing left in user space.

    ``kind`` is what the watcher decided (PROMOTE: the sk_skb splice; BULK:
    the splice(2) relay); the receiver owns both sockets.
    """

    kind: Promotion
    client: socket.socket
    server: socket.socket


class _TunnelBytes(Protocol):
    """What an HBONE stream counts: from its local socket's point of view."""

    @property
    def bytes_up(self) -> int: ...  # read from the local socket, sent into the tunnel

    @property
    def bytes_down(self) -> int: ...  # received from the tunnel, written locally


class TunnelCounters:
    """Live byte counts of an HBONE stream, in client terms.

    ``local_is_client``: True on the outbound side (the local socket is the
    captured client), False on the inbound side (the local socket is the pod).
    """

    __slots__ = ("_local_is_client", "_stream")

    def __init__(self, stream: _TunnelBytes, *, local_is_client: bool) -> None:
        self._stream = stream
        self._local_is_client = local_is_client

    @property
    def from_client(self) -> int:
        s = self._stream
        return s.bytes_up if self._local_is_client else s.bytes_down

    @property
    def to_client(self) -> int:
        s = self._stream
        return s.bytes_down if self._local_is_client else s.bytes_up


_TUNNEL_FLAGS = {
    CloseReason.SHUTDOWN: FLAG_DOWNSTREAM_CLOSED,
    CloseReason.PEER_RESET: FLAG_UPSTREAM_CLOSED,
    CloseReason.CONNECTION_LOST: FLAG_UPSTREAM_CLOSED,
}


def tunnel_result(result: TunnelResult, *, local_is_client: bool) -> RelayResult:
    """A tunnel's end as the proxy reports it (error None when it completed)."""
    if local_is_client:
        from_client, to_client = result.bytes_up, result.bytes_down
    else:
        from_client, to_client = result.bytes_down, result.bytes_up
    if result.reason is CloseReason.COMPLETED:
        return RelayResult(from_client, to_client)
    return RelayResult(
        from_client,
        to_client,
        f"{result.reason.value}: {result.detail}",
        _TUNNEL_FLAGS.get(result.reason),
    )


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Aborts ``transport`` with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


class _Half(asyncio.BufferedProtocol):
    """One socket of a relay; ``peer`` is the other socket's half."""

    def __init__(self, pipe: _Pipe, upstream: bool) -> None:
        self.pipe = pipe
        self.upstream = upstream  # True: this socket is the server side
        self.peer: _Half | None = None
        self.transport: asyncio.Transport | None = None
        self.read_eof = False
        self.lost = False
        self.lost_clean = False
        # Bytes read before the relay started (both transports wired).
        self.pending: list[bytes] = []

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER, low=_LOW_WATER)
        # Nothing is read until both sockets are wired (see _Pipe.start).
        transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _BUFFER.view

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(_BUFFER.view[:nbytes])
        if self.upstream:
            self.pipe.counters.to_client += nbytes
        else:
            self.pipe.counters.from_client += nbytes
        peer = self.peer
        if not self.pipe.started or peer is None or peer.transport is None:
            # Python 3.11 may start reading despite pause_reading() in
            # connection_made; keep the order by queueing until start().
            self.pending.append(data)
            return
        if not peer.lost:
            peer.transport.write(data)
        if self.pipe.watch is not None:
            self.pipe.consider(not self.upstream, nbytes)

    def eof_received(self) -> bool:
        self.read_eof = True
        peer = self.peer
        if not self.pipe.started:
            return True  # start() forwards the EOF after the queued bytes
        if peer is not None and peer.transport is not None and not peer.lost:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            if peer.read_eof:
                # Both directions finished: close both (close() flushes first).
                self.pipe.close_both()
        # Keep this transport open so the other direction can still write.
        return True

    def pause_writing(self) -> None:
        # Our outgoing buffer is full: stop reading from the side that fills it.
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.pipe.handing_over:
            # Draining before a hand-over: this buffer just emptied.
            self.pipe.handover_if_drained()
            return
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self.peer
        if exc is not None and self.pipe.error is None:
            self.pipe.error = f"{'server' if self.upstream else 'client'}: {exc}"
        self.lost_clean = exc is None and self.read_eof
        if self.pipe.handing_over and not self.pipe.done.done():
            # Lost while the write buffers drained for a hand-over (a write
            # failed): no hand-over, the relay ends as it would have.
            self.pipe.handing_over = False
        if self.pipe.handing_over:
            # Closed by the hand-over: the sockets live on in the splice.
            self.pipe.half_lost()
            return
        if self.pipe.started and peer is not None and peer.transport is not None and not peer.lost:
            if exc is not None or not self.read_eof:
                # Reset, or closed without an orderly EOF: do not let the other
                # end believe the stream completed.
                reset_transport(peer.transport)
            else:
                peer.transport.close()
        self.pipe.half_lost()


class _Pipe:
    def __init__(self, counters: ByteCounters) -> None:
        self.counters = counters
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client = _Half(self, upstream=False)
        self.server = _Half(self, upstream=True)
        self.client.peer = self.server
        self.server.peer = self.client
        self._lost = 0
        self.started = False
        # Set by relay_until_handover; None once the decision is NEVER.
        self.watch: Interactivity | None = None
        self.handing_over = False
        self.handover = Promotion.NEVER
        self.all_lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        """Both transports exist: flush anything read early and start reading."""
        self.started = True
        for half in (self.client, self.server):
            peer = half.peer
            assert half.transport is not None and peer is not None and peer.transport is not None
            if peer.lost:
                continue
            for data in half.pending:
                peer.transport.write(data)
            half.pending.clear()
            if half.lost and not half.lost_clean:
                reset_transport(peer.transport)
            elif half.lost:
                peer.transport.close()
            elif half.read_eof and peer.transport.can_write_eof():
                peer.transport.write_eof()
        if self.client.read_eof and self.server.read_eof:
            self.close_both()
        for half in (self.client, self.server):
            if half.transport is not None and not half.lost:
                half.transport.resume_reading()

    def close_both(self) -> None:
        for half in (self.client, self.server):
            if half.transport is not None and not half.lost:
                half.transport.close()

    def reset_both(self) -> None:
        for half in (self.client, self.server):
            if half.transport is not None and not half.lost:
                reset_transport(half.transport)

    def half_lost(self) -> None:
        self._lost += 1
        if self._lost == 2:
            if not self.done.done():
                self.done.set_result(None)
            if not self.all_lost.done():
                self.all_lost.set_result(None)

    def consider(self, from_client: bool, nbytes: int) -> None:
        """After a read was forwarded: promote now, later, or never?"""
        assert self.watch is not None
        halves = (self.client, self.server)
        backlog = sum(
            h.transport.get_write_buffer_size() for h in halves if h.transport is not None
        )
        eof = any(h.read_eof or h.lost or h.transport is None for h in halves)
        decision = self.watch.read(from_client, nbytes, backlog=backlog, eof=eof)
        if decision is Promotion.WAIT:
            return
        self.watch = None
        if decision is Promotion.NEVER or self.done.done():
            return
        # Read no more; what arrives from now on waits in the sockets'
        # receive queues, where the splice picks it up. PROMOTE comes with no
        # backlog; BULK usually has some: with write limits of zero the
        # transport calls resume_writing when its buffer is empty, and the
        # hand-over happens once both are (every byte read is in the kernel).
        self.handing_over = True
        self.handover = decision
        for h in halves:
            assert h.transport is not None
            h.transport.pause_reading()
            h.transport.set_write_buffer_limits(high=0, low=0)
        self.handover_if_drained()

    def handover_if_drained(self) -> None:
        """Ends the relay for the hand-over once no byte waits in user space."""
        if self.done.done():
            return
        for h in (self.client, self.server):
            if h.transport is None or h.transport.get_write_buffer_size():
                return
        self.done.set_result(None)


async def relay_sockets(
    client: socket.socket,
    server: socket.socket,
    counters: ByteCounters | None = None,
) -> RelayResult:
    """Relays between two connected sockets until both directions end.

    Takes ownership of both sockets. ``counters`` is updated live. If the
    calling task is cancelled, both connections are reset and the
    cancellation propagates.
    """
    pipe = _Pipe(counters if counters is not None else ByteCounters())
    await _run(pipe, client, server)
    return RelayResult(pipe.counters.from_client, pipe.counters.to_client, pipe.error)


async def relay_until_handover(
    client: socket.socket,
    server: socket.socket,
    counters: ByteCounters,
    watch: Interactivity,
) -> RelayResult | Handover:
    """:func:`relay_sockets`, until ``watch`` says hand the connection over.

    Returns the relay's result when the connection ended on the relay, or a
    :class:`Handover` of the (client, server) sockets, open and unread since
    the moment of the decision, with nothing left in user space: the caller
    owns them. ``counters`` hold exactly the bytes the relay carried.
    """
    pipe = _Pipe(counters)
    pipe.watch = watch
    await _run(pipe, client, server)
    if not pipe.handing_over:
        return RelayResult(pipe.counters.from_client, pipe.counters.to_client, pipe.error)
    # The transports own the original descriptors: keep the sockets open
    # through duplicates, then let the transports close theirs.
    socks: list[socket.socket] = []
    try:
        for half in (pipe.client, pipe.server):
            assert half.transport is not None
            fd = os.dup(half.transport.get_extra_info("socket").fileno())
            socks.append(socket.socket(fileno=fd))
            socks[-1].setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        pipe.handing_over = False
        pipe.reset_both()
        raise
    for half in (pipe.client, pipe.server):
        if half.transport is not None and not half.lost:
            half.transport.close()
    try:
        await asyncio.shield(pipe.all_lost)
    except asyncio.CancelledError:
        for sock in socks:
            _reset_socket(sock)
        raise
    return Handover(pipe.handover, socks[0], socks[1])


def _reset_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


async def _run(pipe: _Pipe, client: socket.socket, server: socket.socket) -> None:
    """Wires both sockets into ``pipe`` and waits for its end (or its hand-over)."""
    loop = asyncio.get_running_loop()
    try:
        await loop.connect_accepted_socket(lambda: pipe.client, client)
    except BaseException:
        client.close()
        server.close()
        raise
    try:
        await loop.connect_accepted_socket(lambda: pipe.server, server)
    except BaseException:
        server.close()
        if pipe.client.transport is not None:
            reset_transport(pipe.client.transport)
        raise
    pipe.start()
    try:
        await asyncio.shield(pipe.done)
    except asyncio.CancelledError:
        pipe.reset_both()
        raise
