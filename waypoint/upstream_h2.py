"""Upstream HTTP/2: a request that arrived as HTTP/2 leaves as HTTP/2.

gRPC needs HTTP/2 end to end (its status travels in trailers, which
HTTP/1.1 upstreams lose), so the waypoint keeps the downstream protocol, as
Istio's waypoints do for HTTP/2 clients. Per endpoint there is one HTTP/2
connection (prior knowledge, the ``h2`` library) inside one HBONE tunnel
from :meth:`waypoint.upstream.Upstream.tunnel`, multiplexing up to the
peer's ``SETTINGS_MAX_CONCURRENT_STREAMS`` requests; a connection that got
GOAWAY or broke is replaced for the next request.

Flow control: request bodies are sent as the peer's windows allow; response
DATA is acknowledged as the client side consumes it, so a slow client slows
the upstream instead of filling the waypoint's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from .body import RequestBody
from .upstream import Upstream, UpstreamError
from .view import Endpoint

__all__ = ["H2Upstream", "H2UpstreamResponse"]

log = logging.getLogger("veil.waypoint.upstream")

Headers = Sequence[tuple[bytes, bytes]]
_READ = 64 * 1024
_END = object()


class _Stream:
    __slots__ = ("chunks", "head", "pump", "sid", "trailers", "window")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.pump: asyncio.Task[None] | None = None
        self.head: asyncio.Future[list[tuple[bytes, bytes]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.chunks: asyncio.Queue[tuple[bytes, int] | object | Exception] = asyncio.Queue()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.window = asyncio.Event()


class _Connection:
    """One HTTP/2 client connection in one HBONE tunnel to one endpoint."""

    def __init__(
        self, endpoint: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.endpoint = endpoint
        self._reader = reader
        self._writer = writer
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.initiate_connection()
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.relay: asyncio.Task[object] | None = None  # the HBONE relay under it
        self._flush()

    @property
    def usable(self) -> bool:
        limit = self.conn.remote_settings.max_concurrent_streams
        return not self.closed and len(self.streams) < limit

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def run(self) -> None:
        """Reads the connection until it ends; fails every open stream then."""
        why: Exception = UpstreamError(502, "the upstream HTTP/2 connection closed")
        try:
            while not self.closed:
                data = await self._reader.read(_READ)
                if not data:
                    break
                self._handle(self.conn.receive_data(data))
                self._flush()
        except (h2.exceptions.ProtocolError, OSError) as e:
            why = UpstreamError(502, f"the upstream HTTP/2 connection failed: {e}")
        finally:
            self.close(why)

    def _handle(self, events: Sequence[h2.events.Event]) -> None:
        for ev in events:
            st = self.streams.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, h2.events.ResponseReceived) and st is not None:
                if not st.head.done():
                    st.head.set_result([(bytes(n), bytes(v)) for n, v in ev.headers or []])
            elif isinstance(ev, h2.events.DataReceived) and st is not None:
                st.chunks.put_nowait((bytes(ev.data or b""), ev.flow_controlled_length or 0))
            elif isinstance(ev, h2.events.TrailersReceived) and st is not None:
                st.trailers = [(bytes(n), bytes(v)) for n, v in ev.headers or []]
            elif isinstance(ev, h2.events.StreamEnded) and st is not None:
                self._end(st, None)
            elif isinstance(ev, h2.events.StreamReset) and st is not None:
                self._end(
                    st, UpstreamError(502, f"the upstream reset the stream ({ev.error_code})")
                )
            elif isinstance(ev, h2.events.WindowUpdated):
                for s in self.streams.values() if ev.stream_id == 0 else [st] if st else []:
                    s.window.set()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                # GOAWAY: streams above the last one the peer took will never
                # be answered; the connection takes no new ones.
                self.closed = True
                last = ev.last_stream_id or 0
                for s in [s for s in self.streams.values() if s.sid > last]:
                    self._end(s, UpstreamError(503, "the upstream is going away"))

    def _end(self, st: _Stream, exc: Exception | None) -> None:
        self.streams.pop(st.sid, None)
        if st.pump is not None and not st.pump.done():
            st.pump.cancel()  # the upstream answered in full or reset: stop sending
        if exc is not None and not st.head.done():
            st.head.set_exception(exc)
        st.chunks.put_nowait(exc if exc is not None else _END)
        st.window.set()

    def close(self, why: Exception) -> None:
        self.closed = True
        for st in list(self.streams.values()):
            self._end(st, why)
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()

    def open(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> _Stream:
        sid = self.conn.get_next_available_stream_id()
        st = _Stream(sid)
        self.streams[sid] = st
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self._flush()
        return st

    async def send_data(self, st: _Stream, data: bytes, end_stream: bool) -> None:
        """Sends ``data`` as the peer's windows allow (waits for WINDOW_UPDATE)."""
        view = memoryview(data)
        while True:
            if st.sid not in self.streams:
                raise UpstreamError(502, "the upstream ended the stream mid-request")
            window = min(
                self.conn.local_flow_control_window(st.sid), self.conn.max_outbound_frame_size
            )
            if window <= 0 and view:
                st.window.clear()
                await st.window.wait()
                continue
            piece, view = view[:window], view[window:]
            self.conn.send_data(st.sid, bytes(piece), end_stream=end_stream and not view)
            self._flush()
            await self._writer.drain()
            if not view:
                return

    async def pump(self, st: _Stream, body: RequestBody) -> None:
        """Sends a request body that is still arriving, then ends the stream."""
        try:
            while data := await body.read():
                await self.send_data(st, data, end_stream=False)
            await self.send_data(st, b"", end_stream=True)
        except BaseException:
            self.reset(st.sid)  # the upstream must see the request cut short
            raise

    def consumed(self, sid: int, n: int) -> None:
        if n and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.acknowledge_received_data(n, sid)
                self._flush()

    def reset(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is not None and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                self._flush()


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class H2UpstreamResponse:
    """Status and headers of an upstream HTTP/2 answer; body from :meth:`chunks`,
    then :attr:`trailers` (gRPC's status)."""

    def __init__(self, conn: _Connection, st: _Stream, head: list[tuple[bytes, bytes]]) -> None:
        self._conn = conn
        self._st = st
        status = next((v for n, v in head if n == b":status"), b"502")
        self.status = int(status) if status.isdigit() else 502
        self.headers = [(n, v) for n, v in head if not n.startswith(b":")]
        self.bytes = 0
        self._done = False

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return self._st.trailers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body; raises :class:`UpstreamError` when the upstream breaks off."""
        while True:
            item = await self._st.chunks.get()
            if item is _END:
                self._done = True
                return
            if isinstance(item, Exception):
                self._done = True
                raise item
            assert isinstance(item, tuple)
            data, flow = item
            self._conn.consumed(self._st.sid, flow)
            if data:
                self.bytes += len(data)
                yield data

    def abort(self) -> None:
        """The client went away: cancel the upstream stream, and give back the
        window of what arrived but will never be read (else the connection's
        window shrinks for every abandoned response until it stalls)."""
        unread = 0
        while not self._st.chunks.empty():
            item = self._st.chunks.get_nowait()
            if isinstance(item, tuple):
                unread += item[1]
        self._conn.consumed(self._st.sid, unread)
        if not self._done:
            self._conn.reset(self._st.sid)


def h2_request_headers(
    method: str, target: str, authority: str, headers: Headers
) -> list[tuple[bytes, bytes]]:
    """HTTP/2 request headers from the HTTP/1-style list the proxy builds
    (``host`` becomes ``:authority``; only ``te: trailers`` of the hop-by-hop
    fields may cross, which gRPC sends)."""
    out = [
        (b":method", method.encode("latin-1")),
        (b":scheme", b"http"),
        (b":authority", authority.encode("latin-1")),
        (b":path", target.encode("latin-1")),
    ]
    out += [(n.lower(), v) for n, v in headers if n.lower() != b"host"]
    return out


class H2Upstream:
    """HTTP/2 connections to endpoints, one per endpoint, opened on demand."""

    def __init__(self, tunnels: Upstream, *, response_timeout: float = 60.0) -> None:
        self._tunnels = tunnels
        self._timeout = response_timeout
        self._conns: dict[tuple[str, int], _Connection] = {}
        self._opening: dict[tuple[str, int], asyncio.Future[_Connection]] = {}
        self.opened = 0

    async def _connection(self, endpoint: Endpoint) -> _Connection:
        conn = self._conns.get(endpoint.key)
        if conn is not None and conn.usable:
            return conn
        pending = self._opening.get(endpoint.key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_Connection] = asyncio.get_running_loop().create_future()
        self._opening[endpoint.key] = fut
        try:
            reader, writer, relay = await self._tunnels.tunnel(endpoint)
            conn = _Connection(endpoint, reader, writer)
            conn.relay = relay
            conn.task = asyncio.get_running_loop().create_task(conn.run())
            self._conns[endpoint.key] = conn
            self.opened += 1
            fut.set_result(conn)
            return conn
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else UpstreamError(503, "cancelled"))
            fut.exception()  # retrieved: waiters get it, nobody logs it
            raise
        finally:
            self._opening.pop(endpoint.key, None)

    async def request(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        authority: str,
        headers: Headers,
        body: RequestBody,
    ) -> H2UpstreamResponse:
        """Sends one request; returns once the response head arrived (a body
        still arriving keeps streaming: gRPC streams are full duplex)."""
        conn = await self._connection(endpoint)
        framing = [(b"content-length", b"%d" % body.length)] if body.length else []
        pump: asyncio.Task[None] | None = None
        try:
            ready = body.take_ready()
            st = conn.open(
                h2_request_headers(method, target, authority, [*headers, *framing]),
                end_stream=body.done and not ready,
            )
            if ready:
                await conn.send_data(st, ready, end_stream=body.done)
            if not body.done:
                pump = asyncio.get_running_loop().create_task(conn.pump(st, body))
                pump.add_done_callback(_retrieve)
                st.pump = pump
            async with asyncio.timeout(None if pump is not None else self._timeout):
                head = await st.head
        except TimeoutError as e:
            if pump is not None:
                pump.cancel()
            raise UpstreamError(504, f"no answer from {endpoint.workload} in time") from e
        except (h2.exceptions.ProtocolError, OSError) as e:
            conn.close(UpstreamError(502, str(e)))
            raise UpstreamError(502, f"upstream {endpoint.ip}:{endpoint.port} failed: {e}") from e
        return H2UpstreamResponse(conn, st, head)

    def dump(self) -> dict[str, object]:
        return {
            "http2_connections_opened": self.opened,
            "http2_live": {
                f"{ip}:{port}": len(c.streams)
                for (ip, port), c in self._conns.items()
                if not c.closed
            },
        }

    async def close(self) -> None:
        for conn in self._conns.values():
            conn.close(UpstreamError(503, "the waypoint is stopping"))
        tasks = [c.task for c in self._conns.values() if c.task is not None]
        self._conns.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
