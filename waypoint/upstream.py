"""Upstream: HTTP/1.1 requests to endpoints, over HBONE under the waypoint's identity.

A request to an endpoint (a workload IP and target port) travels in an HBONE
tunnel to that workload's node: ``CONNECT <ip>:<port>`` to ``<ip>:15008``,
presenting the waypoint's own certificate and requiring the endpoint's
identity from the server. HBONE connections are pooled by
:class:`~ztunnel.hbone.HboneClientPool` (many tunnels share one mTLS
connection); on top of that, each tunnel carries keep-alive HTTP/1.1 and is
kept idle per endpoint for the next request (bounded count and idle time).

A tunnel's bytes reach the HTTP code through an in-memory pipe
(:mod:`waypoint.pipe`): the HBONE library relays a stream to one end, and the
HTTP side reads and writes asyncio streams on the other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from ztunnel.hbone import ConnectRefused, HboneClientPool, HboneError, relay
from ztunnel.tls import WorkloadCredential

from .body import RequestBody
from .h1 import LAST_CHUNK, H1Response, ResponseParser, chunk, request_bytes
from .pipe import stream_pipe
from .view import Endpoint

__all__ = ["Upstream", "UpstreamError", "UpstreamResponse"]

log = logging.getLogger("veil.waypoint.upstream")
_READ = 64 * 1024


def _retrieve(task: asyncio.Task[None]) -> None:
    """A body pump's error is the request's (raised there, or the connection is
    dropped); mark it retrieved so it is not logged as lost."""
    if not task.cancelled():
        task.exception()


class UpstreamError(Exception):
    """The request could not reach the endpoint or got no valid answer (answer 503/502)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(eq=False)
class _Conn:
    endpoint: Endpoint
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    relay: asyncio.Task[object]
    http: ResponseParser = field(default_factory=ResponseParser)
    events: list[H1Response | bytes | None] = field(default_factory=list)
    idle_since: float = 0.0
    pump: asyncio.Task[None] | None = None  # sends a request body still arriving

    def close(self) -> None:
        self.writer.close()
        if not self.relay.done():
            self.relay.cancel()
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()

    @property
    def reusable(self) -> bool:
        # A request whose body was not sent whole leaves the connection mid-message.
        return (
            self.http.reusable
            and (
                self.pump is None
                or (
                    self.pump.done() and not self.pump.cancelled() and self.pump.exception() is None
                )
            )
            and not self.events
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )


class UpstreamResponse:
    """Status and headers of an upstream answer; the body streams from :meth:`chunks`."""

    def __init__(self, upstream: Upstream, conn: _Conn, head: H1Response) -> None:
        self._up = upstream
        self._conn = conn
        self.status = head.status
        self.headers: list[tuple[bytes, bytes]] = head.headers
        self.bytes = 0
        # HTTP/1.1 trailers are not relayed (llhttp reads past them); gRPC,
        # the user of trailers, goes upstream as HTTP/2.
        self.trailers: list[tuple[bytes, bytes]] = []

    def switched(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """After a 101: the tunnel's raw streams and the first bytes already
        read; the caller owns the connection from here (close the writer)."""
        conn = self._conn
        self._up._live.discard(conn)
        return conn.reader, conn.writer, conn.http.upgraded_tail

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body; raises :class:`UpstreamError` when the upstream breaks off."""
        conn = self._conn
        try:
            while True:
                try:
                    event = await self._up._next(conn)
                except (OSError, ValueError, TimeoutError) as e:
                    raise UpstreamError(502, f"the upstream response broke off: {e}") from e
                if isinstance(event, bytes):
                    self.bytes += len(event)
                    yield event
                elif event is None:
                    break
                else:
                    raise UpstreamError(502, "the upstream sent a second response head")
        except BaseException:
            conn.close()
            raise
        self._up._release(conn)

    def abort(self) -> None:
        """Drops the connection (the body will not be read)."""
        self._conn.close()
        self._up._live.discard(self._conn)


class Upstream:
    def __init__(
        self,
        pool: HboneClientPool,
        credential: Callable[[], WorkloadCredential | None],
        *,
        hbone_port: int = 15008,
        max_idle_per_endpoint: int = 32,
        idle_timeout: float = 30.0,
        response_timeout: float = 60.0,
    ) -> None:
        self._pool = pool
        self._credential = credential
        self.hbone_port = hbone_port
        self._max_idle = max_idle_per_endpoint
        self._idle_timeout = idle_timeout
        self._response_timeout = response_timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._live: set[_Conn] = set()
        self.opened = 0

    async def request(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: RequestBody,
        forwarded_for: tuple[str, int] | None = None,
        *,
        upgrade: bytes | None = None,
    ) -> UpstreamResponse:
        """Sends one request; returns once the response head arrived.

        ``upgrade``: the request asks to switch to that protocol (websocket):
        it goes on a tunnel of its own with ``Connection: upgrade``; after a 101
        :meth:`UpstreamResponse.switched` hands over the raw streams.

        A body that already arrived whole goes out with the head in one write;
        one still arriving is sent by a pump task while the response is awaited
        (an upstream may answer early). The response timeout runs from the
        moment the whole request was sent."""
        if upgrade is not None:
            conn = await self._open(endpoint, forwarded_for)
            headers = [*headers, (b"connection", b"upgrade"), (b"upgrade", upgrade)]
        else:
            conn = self._take_idle(endpoint) or await self._open(endpoint, forwarded_for)
        try:
            conn.http.start(method, upgrade=upgrade is not None)
            chunked = body.length is None
            framing = (
                [(b"transfer-encoding", b"chunked")]
                if chunked
                else [(b"content-length", b"%d" % body.length)]
                if body.length
                else []
            )
            ready = body.take_ready()
            out = request_bytes(method, target, [*headers, *framing], b"")
            if ready:
                out += chunk(ready) if chunked else ready
            if body.done:
                conn.writer.write(out + LAST_CHUNK if chunked else out)
                await conn.writer.drain()
                event = await self._next(conn)
            else:
                conn.writer.write(out)
                conn.pump = asyncio.get_running_loop().create_task(self._pump(conn, body, chunked))
                conn.pump.add_done_callback(_retrieve)
                event = await self._first_event(conn, conn.pump)
            if isinstance(event, H1Response):
                return UpstreamResponse(self, conn, event)
            raise UpstreamError(502, "the upstream answered without a response head")
        except (OSError, ValueError, asyncio.IncompleteReadError) as e:
            conn.close()
            self._live.discard(conn)
            raise UpstreamError(502, f"upstream {endpoint.ip}:{endpoint.port} failed: {e}") from e
        except BaseException:
            conn.close()
            self._live.discard(conn)
            raise

    async def _next(self, conn: _Conn, *, timed: bool = True) -> H1Response | bytes | None:
        """The next response event; raises ValueError for a malformed or cut response."""
        while not conn.events:
            async with asyncio.timeout(self._response_timeout if timed else None):
                data = await conn.reader.read(_READ)
            conn.events = conn.http.feed(data) if data else conn.http.feed_eof()
        return conn.events.pop(0)

    async def _first_event(
        self, conn: _Conn, pump: asyncio.Task[None]
    ) -> H1Response | bytes | None:
        """The response head while the body is still being sent: whichever
        comes first; the timeout starts once the body is out."""
        nxt = asyncio.ensure_future(self._next(conn, timed=False))
        try:
            done, _ = await asyncio.wait({pump, nxt}, return_when=asyncio.FIRST_COMPLETED)
            if nxt in done:
                return nxt.result()
            pump.result()  # the client's error (cut body, 413) ends the exchange
            async with asyncio.timeout(self._response_timeout):
                return await nxt
        finally:
            if not nxt.done():
                nxt.cancel()

    @staticmethod
    async def _pump(conn: _Conn, body: RequestBody, chunked: bool) -> None:
        w = conn.writer
        try:
            while data := await body.read():
                w.write(chunk(data) if chunked else data)
                await w.drain()
            if chunked:
                w.write(LAST_CHUNK)
            await w.drain()
        except BaseException:
            # A request cut short: the upstream must see it end, not wait.
            w.close()
            raise

    def _take_idle(self, endpoint: Endpoint) -> _Conn | None:
        held = self._idle.get(endpoint.key)
        now = time.monotonic()
        while held:
            conn = held.pop()
            if conn.reusable and now - conn.idle_since < self._idle_timeout:
                return conn
            conn.close()
            self._live.discard(conn)
        return None

    async def tunnel(
        self, endpoint: Endpoint, forwarded_for: tuple[str, int] | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[object]]:
        """A new HBONE tunnel to ``endpoint`` (pooled mTLS connection, new
        stream) as asyncio streams, and the task relaying it. Raises
        :class:`UpstreamError` (503) when the endpoint cannot be reached."""
        cred = self._credential()
        if cred is None:
            raise UpstreamError(503, "the waypoint has no certificate yet")
        try:
            stream = await self._pool.open_stream(
                cred,
                endpoint.ip,
                self.hbone_port,
                endpoint.identity,
                (endpoint.ip, endpoint.port),
                forwarded_for,
            )
        except ConnectRefused as e:
            raise UpstreamError(503, f"{endpoint.workload} refused the tunnel: {e}") from e
        except HboneError as e:
            raise UpstreamError(503, f"cannot reach {endpoint.workload}: {e}") from e
        end, reader, writer = stream_pipe(f"{endpoint.ip}:{endpoint.port}")
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(relay(stream, end))
        self.opened += 1
        return reader, writer, task

    async def _open(self, endpoint: Endpoint, forwarded_for: tuple[str, int] | None) -> _Conn:
        reader, writer, task = await self.tunnel(endpoint, forwarded_for)
        conn = _Conn(endpoint, reader, writer, task)
        self._live.add(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        held = self._idle.setdefault(conn.endpoint.key, [])
        if conn.reusable and len(held) < self._max_idle:
            conn.idle_since = time.monotonic()
            held.append(conn)
            return
        conn.close()
        self._live.discard(conn)

    def dump(self) -> dict[str, object]:
        return {
            "tunnels_opened": self.opened,
            "live": len(self._live),
            "idle": {f"{ip}:{port}": len(c) for (ip, port), c in self._idle.items() if c},
        }

    async def close(self) -> None:
        for conn in list(self._live):
            conn.close()
        self._live.clear()
        self._idle.clear()
