"""The asyncio driver of one HBONE (HTTP/2 over mTLS) connection.

:class:`H2Endpoint` is the ``BufferedProtocol`` on top of the TLS transport. It
owns an :class:`~ztunnel.hbone.http2.connection.H2Connection` and does what the
sans-IO core cannot: verifying the peer right after the handshake (ALPN h2 and
the SPIFFE identity, :mod:`ztunnel.tls.verify`), moving bytes, routing events
to :class:`~ztunnel.hbone.stream.TunnelStream` objects, write backpressure,
PING keepalive, idle and graceful close, and the deadlines for the peer's
preface and SETTINGS acknowledgement.

Two guards keep one connection from hurting the others on the same loop:

* at most ``max_frames_per_turn`` frames are handled per event-loop turn; the
  rest of a read is kept (reading paused) and handled on the next turn, after
  every other ready callback had its go;
* nothing raised while handling the peer's bytes escapes into the transport
  (where uvloop would abort the connection without a GOAWAY): an unexpected
  error is logged and ends this connection with GOAWAY(INTERNAL_ERROR). The client and server roles subclass
it (:mod:`ztunnel.hbone.client`, :mod:`ztunnel.hbone.server`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar, cast

from controller.api.spiffe import SpiffeId
from ztunnel.tls import PeerVerificationError, check_alpn, verify_peer

from .buffers import shared_buffer
from .config import HboneConfig
from .errors import HboneError
from .http2.connection import H2Connection, Role
from .http2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAcked,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from .http2.frames import ErrorCode
from .stream import PAUSE_CONN, CloseReason, TunnelStream

__all__ = ["H2Endpoint", "close_selected", "drain", "wait_all"]

log = logging.getLogger(__name__)
_COALESCE = 64 * 1024  # join writes up to this size: fewer, fuller TLS records


class H2Endpoint(asyncio.BufferedProtocol):
    """One verified HTTP/2 connection and its live streams."""

    def __init__(
        self,
        role: Role,
        config: HboneConfig,
        trust_domain: str,
        expected_identity: SpiffeId | None,
        idle_timeout: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn = H2Connection(role, config.h2, clock=self.loop.time)
        self.config = config
        self.trust_domain = trust_domain
        self.expected_identity = expected_identity
        self.peer_identity: SpiffeId | None = None
        self.peer_addr: tuple[str, int] = ("", 0)
        self.local_addr: tuple[str, int] = ("", 0)
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None
        self.close_detail = ""  # why the connection stopped taking streams, for errors
        self.streams: dict[int, TunnelStream] = {}
        self.blocked: set[TunnelStream] = set()  # streams waiting for send window
        self.write_paused = False
        self.ready: asyncio.Future[BaseException | None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._idle_timeout = idle_timeout
        self._rbuf = shared_buffer(config.tls_read_size)
        self._view: memoryview | None = None
        self._rx_seen = False
        self._ping_pending = False
        self._keepalive: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._deadlines: list[asyncio.TimerHandle] = []
        self._backlog = memoryview(b"")  # received bytes left for the next loop turn
        self._backlog_turn: asyncio.Handle | None = None

    # --------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.peer_addr = _addr(transport.get_extra_info("peername"))
        self.local_addr = _addr(transport.get_extra_info("sockname"))
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            if ssl_object is None:
                raise PeerVerificationError("HBONE runs over TLS only; refusing plaintext")
            check_alpn(ssl_object)
            self.peer_identity = verify_peer(ssl_object, self.expected_identity, self.trust_domain)
        except PeerVerificationError as exc:
            self.error = exc
            log.info("hbone peer %s refused: %s", _fmt(self.peer_addr), exc)
            server = self.conn.role is Role.SERVER
            if server and ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                # Tell an h2 client why, so its error names the cause.
                self.conn.initiate()
                self.conn.close(ErrorCode.INADEQUATE_SECURITY, f"client refused: {exc.message}")
                self.flush()
                transport.close()
                return
            transport.abort()
            return
        self.conn.initiate()
        self.flush()
        self._keepalive = self.loop.call_later(self.config.keepalive_interval, self._tick)
        self._deadlines = [
            self.loop.call_later(self.config.preface_timeout, self._check_preface),
            self.loop.call_later(self.config.settings_ack_timeout, self._check_settings_ack),
        ]
        self._arm_idle()
        self.ready.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        self._view = view = self._rbuf.view()
        return view

    def buffer_updated(self, nbytes: int) -> None:
        view = self._view
        assert view is not None
        # Dropping our reference is enough: the transport may still hold the
        # buffer during this call, so it cannot be released explicitly.
        self._view = None
        self._rx_seen = True
        if self._backlog:  # a read that was already under way when reading paused
            self._backlog = memoryview(bytes(self._backlog) + view[:nbytes])
            return
        self._receive(view[:nbytes], copy=True)

    def _receive(self, data: memoryview, copy: bool) -> None:
        """Handle up to a turn's worth of frames; keep the rest for the next turn."""
        try:
            events, used = self.conn.receive_some(data, self.config.max_frames_per_turn)
            for event in events:
                self._dispatch(event)
        except Exception as exc:  # our bug, not the peer's: it must not kill the loop
            self._internal_error(exc)
            return
        self.flush()
        t = self.transport
        if used < len(data) and t is not None and not t.is_closing():
            # ``data`` may be the shared read buffer, which the next read reuses:
            # copy the rest once, then work through it a turn at a time.
            rest = data[used:]
            self._backlog = memoryview(bytes(rest)) if copy else rest
            if self._backlog_turn is None:
                t.pause_reading()
            self._backlog_turn = self.loop.call_soon(self._next_turn)
        elif self._backlog_turn is not None:
            self._backlog_turn = None
            if t is not None and not t.is_closing():
                t.resume_reading()

    def _next_turn(self) -> None:
        data, self._backlog = self._backlog, memoryview(b"")
        self._receive(data, copy=False)

    def _internal_error(self, exc: Exception) -> None:
        log.error(
            "hbone: internal error on the connection with %s; closing it",
            _fmt(self.peer_addr),
            exc_info=exc,
        )
        self.error = HboneError(
            f"internal error on the HBONE connection: {exc!r}",
            hint="this is a bug; the connection was closed with GOAWAY(INTERNAL_ERROR)",
        )
        self._backlog = memoryview(b"")
        try:
            for stream in list(self.streams.values()):
                stream._on_connection_lost(str(self.error))
        finally:
            self.conn.close(ErrorCode.INTERNAL_ERROR, "internal error")
            self.flush()
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool:
        self._view = None  # the read that found EOF got a buffer it never filled
        return False  # TLS close_notify or TCP FIN: the connection is over

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            if stream._tcp is not None:
                stream._tcp.pause(PAUSE_CONN)

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if stream._tcp is not None:
                stream._tcp.resume(PAUSE_CONN)

    def connection_lost(self, exc: Exception | None) -> None:
        self._view = None
        self._backlog = memoryview(b"")
        for handle in (self._keepalive, self._idle, self._backlog_turn, *self._deadlines):
            if handle is not None:
                handle.cancel()
        err = self.error or exc or self.conn.error
        detail = str(err) if err else "the HBONE connection closed"
        for stream in list(self.streams.values()):
            stream._on_connection_lost(detail)
        self.streams.clear()
        self.blocked.clear()
        self.conn.closed = True
        if not self.ready.done():
            self.ready.set_result(err or HboneError("the HBONE connection closed during setup"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_closed()

    def flush(self) -> None:
        """Write everything the connection queued, in as few transport calls as possible."""
        out = self.conn.data_to_send()
        t = self.transport
        if not out or t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > self.config.max_write_backlog:
            # Data is flow controlled and local reads pause above the high-water
            # mark, so only control frames to a peer that stopped reading get here.
            self.error = HboneError(
                f"the HBONE peer {_fmt(self.peer_addr)} stopped reading; "
                f"{t.get_write_buffer_size()} bytes are waiting",
                hint="the connection is closed to bound memory",
            )
            log.info("%s", self.error)
            t.abort()
            return
        if len(out) == 1:
            t.write(out[0])
        elif sum(map(len, out)) <= _COALESCE:
            t.write(b"".join(out))
        else:
            t.writelines(out)

    # ------------------------------------------------------------ events

    def _dispatch(self, event: Event) -> None:
        kind = type(event)
        if kind is DataReceived:
            assert isinstance(event, DataReceived)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_data(event.data)
            else:
                self.conn.acknowledge_received_data(event.stream_id, len(event.data))
        elif kind is WindowUpdated or kind is RemoteSettingsChanged:
            sid = event.stream_id if isinstance(event, WindowUpdated) else 0
            if sid == 0:
                for blocked in list(self.blocked):
                    blocked._on_window()
            elif (stream := self.streams.get(sid)) is not None:
                stream._on_window()
        elif isinstance(event, StreamEnded):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._on_remote_end()
        elif isinstance(event, StreamReset):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._on_reset(event.error_code, event.remote)
        elif isinstance(event, PingAcked):
            self._ping_pending = False
        elif isinstance(event, RequestReceived):
            self._on_request(event)
        elif isinstance(event, ResponseReceived):
            self._on_response(event)
        elif isinstance(event, ConnectionTerminated):
            self._on_terminated(event)

    def _on_request(self, event: RequestReceived) -> None:
        self.conn.reset_stream(event.stream_id, ErrorCode.REFUSED_STREAM)

    def _on_response(self, event: ResponseReceived) -> None:
        self.conn.reset_stream(event.stream_id, ErrorCode.PROTOCOL_ERROR)

    def _on_terminated(self, event: ConnectionTerminated) -> None:
        who = "the peer" if event.remote else "us"
        detail = f"GOAWAY {_code_name(event.error_code)} from {who}"
        self.close_detail = f"{detail}: {event.message}" if event.message else detail
        if event.fatal:
            detail = self.close_detail
            for stream in list(self.streams.values()):
                stream._on_connection_lost(detail)
            self.flush()
            if self.transport is not None:
                self.transport.close()
        else:
            self._close_if_drained()

    def _on_closed(self) -> None:
        """Hook: the transport is gone (the pool and the server deregister here)."""

    # ------------------------------------------------------------ streams

    def register(self, stream: TunnelStream) -> None:
        self.streams[stream.stream_id] = stream
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def unregister(self, stream: TunnelStream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self.flush()
        if not self.streams:
            self._arm_idle()
            self._close_if_drained()

    @property
    def going_away(self) -> bool:
        return self.conn.closed or self.conn.goaway_sent or self.conn.goaway_received

    def _close_if_drained(self) -> None:
        if self.going_away and not self.streams and self.transport is not None:
            self.flush()
            self.transport.close()

    def close_gracefully(self, message: str = "") -> None:
        """GOAWAY(NO_ERROR): no new streams; the connection closes when the last ends."""
        if not self.conn.closed:
            self.conn.close(ErrorCode.NO_ERROR, message)
            self.flush()
        self._close_if_drained()

    def terminate(self, reason: CloseReason, detail: str, *, abort: bool = False) -> None:
        """Reset every stream with ``reason`` and close the connection now; ``abort``
        skips the TLS close_notify exchange (the peer is not answering)."""
        for stream in list(self.streams.values()):
            stream.close(reason, detail)
        if not self.conn.closed:
            self.conn.close(ErrorCode.NO_ERROR, detail)
        self.flush()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    # ------------------------------------------------------------- timers

    def _arm_idle(self) -> None:
        if self._idle is None and not self.streams and self.transport is not None:
            self._idle = self.loop.call_later(self._idle_timeout, self._idle_expired)

    def _check_preface(self) -> None:
        if not self.conn.preface_received:
            what = "connection preface and SETTINGS"
            self._deadline_missed(what, self.config.preface_timeout, ErrorCode.PROTOCOL_ERROR)

    def _check_settings_ack(self) -> None:
        if not self.conn.settings_acknowledged:
            what = "acknowledgement of our SETTINGS"
            self._deadline_missed(
                what, self.config.settings_ack_timeout, ErrorCode.SETTINGS_TIMEOUT
            )

    def _deadline_missed(self, what: str, timeout: float, code: int) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.conn.closed:
            return
        self.error = HboneError(
            f"the HBONE peer {_fmt(self.peer_addr)} did not send its {what} within {timeout:g}s",
            hint="a slow or stalled peer holds a connection slot; it is closed",
        )
        log.info("%s", self.error)
        self.conn.close(code, f"no {what} within {timeout:g}s")
        self.flush()
        t.close()

    def _idle_expired(self) -> None:
        self._idle = None
        if not self.streams:
            self.close_gracefully("idle")

    def _tick(self) -> None:
        """PING keepalive: a peer silent for an interval gets a PING; no answer closes."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._rx_seen:
            self._rx_seen = False
            self._ping_pending = False
            delay = self.config.keepalive_interval
        elif self._ping_pending:
            self.error = HboneError(
                f"the HBONE peer {_fmt(self.peer_addr)} did not answer a keepalive PING "
                f"within {self.config.keepalive_timeout:g}s",
                hint="the peer or the network path is down; the connection is closed",
            )
            log.info("%s", self.error)
            self.terminate(CloseReason.CONNECTION_LOST, str(self.error), abort=True)
            return
        else:
            self.conn.send_ping(os.urandom(8))
            self.flush()
            self._ping_pending = True
            delay = self.config.keepalive_timeout
        self._keepalive = self.loop.call_later(delay, self._tick)


def _addr(value: object) -> tuple[str, int]:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return ("", 0)


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return hex(code)


S = TypeVar("S", bound=TunnelStream)


def close_selected(
    streams: Iterable[S], predicate: Callable[[S], bool], reason: CloseReason, detail: str
) -> int:
    """Resets the streams ``predicate`` selects (policy re-check); returns how many."""
    chosen = [s for s in streams if predicate(s)]
    for stream in chosen:
        stream.close(reason, detail)
    return len(chosen)


async def drain(endpoints: Sequence[H2Endpoint], grace: float) -> None:
    """Graceful shutdown of a set of connections, client or server side alike.

    GOAWAY on each, let their streams finish for ``grace`` seconds, then reset
    what is left and wait (briefly) for the transports to close.
    """
    for ep in endpoints:
        ep.close_gracefully("shutting down")
    await wait_all((ep.closed for ep in endpoints), grace)
    for ep in endpoints:
        ep.terminate(CloseReason.SHUTDOWN, "shutdown grace period ended", abort=True)
    await wait_all((ep.closed for ep in endpoints), 1.0)


async def wait_all(futures: Iterable[asyncio.Future[None]], timeout: float) -> None:
    pending = [f for f in futures if not f.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
