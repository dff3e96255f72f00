"""One tunnelled TCP connection: an HTTP/2 stream bound to a local TCP socket.

:class:`TunnelStream` is the IO half of an HBONE stream, shared by the client
(:class:`~ztunnel.hbone.client.HboneStream`) and the server
(:class:`~ztunnel.hbone.server.InboundStream`). :func:`relay` binds it to the
local socket (the application's on the client, the pod's on the server) and
returns a :class:`RelayResult` when both directions are done;
:func:`start_relay` binds it the same way and returns a future at once, for a
caller that holds many connections without a task each.

The data path, both ways without copies in the steady state:

* local -> peer: the socket is read 256 KiB at a time into the thread's shared
  buffer (:mod:`ztunnel.hbone.buffers`) and sent as DATA frames referencing it.
  When the stream's send window is exhausted the rest is kept (copied, the only
  copy) and reading pauses until WINDOW_UPDATE; reading also pauses while the
  TLS transport is above its high-water mark.
* peer -> local: DATA payload slices are written to the socket as they arrive.
  The HTTP/2 window is reopened only once the socket transport took the bytes
  without passing its high-water mark, so a slow local reader throttles the
  remote sender instead of growing a buffer here.

Half-close maps both ways (TCP FIN <-> END_STREAM); a TCP error resets the
stream (RST_STREAM CANCEL) and an RST_STREAM aborts the socket with a TCP RST,
so neither end mistakes an aborted stream for a complete one. Cancelling the
task awaiting :func:`relay`, or :meth:`TunnelStream.close`, resets both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from controller.api.spiffe import SpiffeId

from .buffers import shared_buffer
from .errors import LocalProtocolError
from .http2.frames import ErrorCode

if TYPE_CHECKING:
    from .endpoint import H2Endpoint

__all__ = ["CloseReason", "RelayResult", "TunnelStream", "relay", "start_relay"]

_LINGER_RESET = struct.pack("ii", 1, 0)
PAUSE_WINDOW = 1  # the stream's send window is exhausted
PAUSE_CONN = 2  # the TLS transport is above its high-water mark


class CloseReason(enum.Enum):
    COMPLETED = "completed"  # both directions ended with FIN / END_STREAM
    REJECTED = "rejected"  # the CONNECT was answered with a non-2xx status
    LOCAL_RESET = "local reset"  # the local TCP connection failed or was reset
    PEER_RESET = "peer reset"  # RST_STREAM from the HBONE peer
    CONNECTION_LOST = "connection lost"  # the HBONE connection ended under the stream
    CLOSED = "closed"  # close() was called (e.g. policy no longer allows it)
    CANCELLED = "cancelled"  # the task awaiting relay() was cancelled
    SHUTDOWN = "shutdown"  # the ztunnel shut down and the grace period ended


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a tunnelled connection ended.

    ``bytes_up``: read from the local socket and sent into the tunnel;
    ``bytes_down``: received from the tunnel and written to the local socket.
    (On a client that is app->peer / peer->app; on a server pod->client /
    client->pod, from the pod's side of the tunnel.)
    """

    bytes_up: int
    bytes_down: int
    reason: CloseReason
    detail: str = ""


class TunnelStream:
    """An HBONE stream and, once :func:`relay` attached it, its local socket."""

    def __init__(self, endpoint: H2Endpoint, stream_id: int) -> None:
        self._ep = endpoint
        self.stream_id = stream_id
        self.bytes_up = 0
        self.bytes_down = 0
        self._tcp: _TcpSide | None = None
        self._early: list[bytes] | None = None  # peer bytes that arrived before the socket
        self._held = 0  # received bytes not yet acknowledged to the peer
        self._pending: bytes | memoryview | None = None  # local bytes waiting for window
        self._local_eof = False
        self._end_sent = False
        self._remote_eof = False
        self._tcp_write_paused = False
        self._result: RelayResult | None = None
        # Created when someone waits (relay() does); see _waiter().
        self._done: asyncio.Future[RelayResult] | None = None

    @property
    def peer_identity(self) -> SpiffeId | None:
        """The verified SPIFFE ID of the HBONE peer."""
        return self._ep.peer_identity

    @property
    def result(self) -> RelayResult | None:
        """How the stream ended, or None while it is live."""
        return self._result

    @property
    def is_closed(self) -> bool:
        return self._result is not None

    @property
    def relaying(self) -> bool:
        """True once :func:`start_relay` bound a local socket and until the end."""
        return self._tcp is not None and self._result is None

    async def wait_closed(self) -> RelayResult:
        return await asyncio.shield(self._waiter())

    def _waiter(self) -> asyncio.Future[RelayResult]:
        """The future :meth:`_finish` resolves. relay() awaits it without a shield
        (one object fewer per live connection), so a cancelled relay cancels it;
        the next waiter then gets a fresh one."""
        done = self._done
        if done is None or done.cancelled():
            done = self._done = asyncio.get_running_loop().create_future()
            if self._result is not None:
                done.set_result(self._result)
        return done

    def close(self, reason: CloseReason = CloseReason.CLOSED, detail: str = "") -> None:
        """Reset the stream and the local socket now (policy re-check, shutdown)."""
        self._abort(reason, detail, reset=True)

    # ------------------------------------------------------- peer -> local

    def _on_data(self, data: memoryview) -> None:
        self._held += len(data)
        if self._tcp is None or self._early:
            if self._early is None:
                self._early = []
            self._early.append(bytes(data))
        else:
            self._write_local(data)

    def _write_local(self, data: bytes | memoryview) -> None:
        assert self._tcp is not None and self._tcp.transport is not None
        transport = self._tcp.transport
        # A transport with a backlog keeps what it is given; never let it keep a
        # slice of the shared read buffer (see ztunnel.hbone.buffers).
        if transport.get_write_buffer_size() and isinstance(data, memoryview):
            data = bytes(data)
        transport.write(data)
        self.bytes_down += len(data)
        if not self._tcp_write_paused:
            self._release_held()

    def _release_held(self) -> None:
        if self._held:
            held, self._held = self._held, 0
            conn = self._ep.conn
            if not conn.closed:
                conn.acknowledge_received_data(self.stream_id, held)

    def _on_tcp_resume_writing(self) -> None:
        self._tcp_write_paused = False
        self._release_held()
        self._ep.flush()

    def _on_remote_end(self) -> None:
        self._remote_eof = True
        if self._tcp is not None and not self._early:
            self._tcp.write_eof()
        self._check_done()

    # ------------------------------------------------------- local -> peer

    def _local_data(self, data: memoryview) -> None:
        if self._result is not None:
            return
        self.bytes_up += len(data)
        if self._pending is not None:
            # Read despite a pause (uvloop starts reading after connection_made,
            # undoing a pause made there): queue behind what already waits.
            self._pending = bytes(self._pending) + bytes(data)
            assert self._tcp is not None
            self._tcp.reassert_pause()
            return
        try:
            sent = self._ep.conn.send_data(self.stream_id, data)
        except LocalProtocolError as exc:
            self._abort(CloseReason.CONNECTION_LOST, str(exc), reset=False)
            return
        if sent < len(data):
            self._pending = bytes(data[sent:])
            self._ep.blocked.add(self)
            assert self._tcp is not None
            self._tcp.pause(PAUSE_WINDOW)
        self._ep.flush()

    def _on_window(self) -> None:
        pending = self._pending
        if pending is None or self._result is not None:
            self._ep.blocked.discard(self)
            return
        try:
            sent = self._ep.conn.send_data(self.stream_id, pending)
        except LocalProtocolError as exc:
            self._abort(CloseReason.CONNECTION_LOST, str(exc), reset=False)
            return
        if sent < len(pending):
            self._pending = memoryview(pending)[sent:]
            return
        self._pending = None
        self._ep.blocked.discard(self)
        if self._tcp is not None:
            self._tcp.resume(PAUSE_WINDOW)
        if self._local_eof:
            self._send_end()

    def _local_eof_received(self) -> None:
        self._local_eof = True
        if self._pending is None:
            self._send_end()

    def _send_end(self) -> None:
        if self._end_sent or self._result is not None:
            return
        self._end_sent = True
        with contextlib.suppress(LocalProtocolError):
            self._ep.conn.end_stream(self.stream_id)
        self._ep.flush()
        self._check_done()

    # ----------------------------------------------------------- lifecycle

    def _attach(self, tcp: _TcpSide) -> None:
        self._tcp = tcp
        if self._result is not None:  # reset while the socket was being wrapped
            tcp.abort()
            return
        if self._ep.write_paused:
            tcp.pause(PAUSE_CONN)
        early, self._early = self._early, None
        for chunk in early or ():
            self._write_local(chunk)
        if self._remote_eof:
            tcp.write_eof()
        self._ep.flush()
        self._check_done()

    def _check_done(self) -> None:
        if self._end_sent and self._remote_eof and self._tcp is not None and not self._early:
            self._tcp.close()
            self._finish(CloseReason.COMPLETED, "")

    def _on_reset(self, code: int, remote: bool) -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = hex(code)
        if remote:
            self._abort(CloseReason.PEER_RESET, f"RST_STREAM {name} from the peer", reset=False)
        else:
            self._abort(CloseReason.LOCAL_RESET, f"stream error {name}", reset=False)

    def _on_connection_lost(self, detail: str) -> None:
        self._abort(CloseReason.CONNECTION_LOST, detail, reset=False)

    def _on_tcp_lost(self, exc: Exception | None) -> None:
        if self._result is not None:
            return
        if exc is None and self._end_sent and self._remote_eof:
            self._finish(CloseReason.COMPLETED, "")
        else:
            detail = str(exc) if exc else "the local connection closed"
            self._abort(CloseReason.LOCAL_RESET, detail, reset=True)

    def _abort(self, reason: CloseReason, detail: str, *, reset: bool) -> None:
        if self._result is not None:
            return
        if reset and not self._ep.conn.closed:
            self._ep.conn.reset_stream(self.stream_id, ErrorCode.CANCEL)
            self._ep.flush()
        if self._tcp is not None:
            self._tcp.abort()
        self._finish(reason, detail)

    def _finish(self, reason: CloseReason, detail: str) -> None:
        if self._result is not None:
            return
        self._result = RelayResult(self.bytes_up, self.bytes_down, reason, detail)
        self._early = None
        self._pending = None
        # Whatever was received and not delivered still holds connection window.
        self._release_held()
        self._ep.blocked.discard(self)
        self._ep.unregister(self)
        done = self._done
        if done is not None and not done.done():
            done.set_result(self._result)

    def _prepare_relay(self) -> None:
        """Hook run by :func:`relay` before attaching the socket (server: send 200)."""


class _TcpSide(asyncio.BufferedProtocol):
    """The local TCP socket of a tunnel."""

    __slots__ = ("_closing", "_paused", "_rbuf", "_stream", "_view", "transport")

    def __init__(self, stream: TunnelStream, read_size: int) -> None:
        self._stream = stream
        self._rbuf = shared_buffer(read_size)
        self._view: memoryview | None = None
        self._paused = 0
        self._closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._stream._attach(self)
        if self._paused:
            # uvloop starts reading right after connection_made returns.
            asyncio.get_running_loop().call_soon(self.reassert_pause)

    def reassert_pause(self) -> None:
        if self._paused and self.transport is not None and not self._closing:
            self.transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        self._view = view = self._rbuf.view()
        return view

    def buffer_updated(self, nbytes: int) -> None:
        view = self._view
        assert view is not None
        self._view = None  # see H2Endpoint.buffer_updated
        self._stream._local_data(view[:nbytes])

    def eof_received(self) -> bool:
        # The read that found EOF (or an error) got a buffer and never filled
        # it: drop it, or this half-closed socket keeps a pooled buffer busy.
        self._view = None
        self._stream._local_eof_received()
        return True  # keep the write side open: the other direction may go on

    def connection_lost(self, exc: Exception | None) -> None:
        self._view = None
        self._stream._on_tcp_lost(exc)

    def pause_writing(self) -> None:
        self._stream._tcp_write_paused = True

    def resume_writing(self) -> None:
        self._stream._on_tcp_resume_writing()

    def pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        was = self._paused
        self._paused &= ~reason
        if was and not self._paused and self.transport is not None and not self._closing:
            self.transport.resume_reading()

    def write_eof(self) -> None:
        t = self.transport
        if t is not None and not self._closing and t.can_write_eof():
            t.write_eof()

    def close(self) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def abort(self) -> None:
        """Close with a TCP RST, so the local peer knows the stream did not complete."""
        t = self.transport
        if t is None or self._closing:
            return
        self._closing = True
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        t.abort()


async def relay(stream: TunnelStream, local: socket.socket | asyncio.Transport) -> RelayResult:
    """Relay between ``stream`` and a local TCP connection until both directions end.

    ``local`` is a connected socket (the relay takes ownership and closes it) or
    an existing transport (its protocol is replaced). On a server stream that has
    not been answered yet, the 200 goes out first. Cancelling the caller resets
    both sides and re-raises.
    """
    done = await start_relay(stream, local)
    try:
        return await done
    except asyncio.CancelledError:
        stream._abort(CloseReason.CANCELLED, "the relay task was cancelled", reset=True)
        raise


async def start_relay(
    stream: TunnelStream, local: socket.socket | asyncio.Transport
) -> asyncio.Future[RelayResult]:
    """Binds ``stream`` to ``local`` as :func:`relay` does, and returns as soon as
    the bytes flow: the future resolves with the :class:`RelayResult` when both
    directions end.

    The relay runs on transport callbacks alone, so nothing has to await it: a
    caller holding thousands of connections can add a done callback instead of
    keeping a task and its coroutine frames per connection. Cancelling the
    future does not stop the relay; :meth:`TunnelStream.close` does.
    """
    loop = asyncio.get_running_loop()
    size = stream._ep.config.tcp_read_size
    if stream.result is None:
        stream._prepare_relay()
    if stream.result is not None:
        if isinstance(local, socket.socket):
            local.close()
        else:
            local.abort()
        return stream._waiter()
    try:
        if isinstance(local, socket.socket):
            local.setblocking(False)
            await loop.connect_accepted_socket(lambda: _TcpSide(stream, size), local)
        else:
            proto = _TcpSide(stream, size)
            local.set_protocol(proto)
            proto.connection_made(local)
            local.resume_reading()
    except asyncio.CancelledError:
        stream._abort(CloseReason.CANCELLED, "the relay task was cancelled", reset=True)
        raise
    except OSError as exc:
        stream._abort(CloseReason.LOCAL_RESET, str(exc), reset=True)
        if isinstance(local, socket.socket):
            local.close()
    return stream._waiter()
