"""Upstream: HTTP/1.1 requests to endpoints, over HBONE under the waypoint's identity.

A request to an endpoint (a workload IP and target port) travels in an HBONE
tunnel to that workload's node: ``CONNECT <ip>:<port>`` to ``<ip>:15008``,
presenting the waypoint's own certificate and requiring the endpoint's
identity from the server. HBONE connections are pooled by
:class:`~ztunnel.hbone.HboneClientPool` (many tunnels share one mTLS
connection); on top of that, each tunnel carries keep-alive HTTP/1.1 and is
kept idle per endpoint for the next request (bounded count and idle time).

A tunnel's bytes reach the HTTP code through a local socket pair: the HBONE
library relays a stream to a socket, and the HTTP side reads the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import h11

from ztunnel.hbone import ConnectRefused, HboneClientPool, HboneError, relay
from ztunnel.tls import WorkloadCredential

from .view import Endpoint

__all__ = ["Upstream", "UpstreamError", "UpstreamResponse", "tunnel_socket"]

log = logging.getLogger("veil.waypoint.upstream")
_READ = 64 * 1024


class UpstreamError(Exception):
    """The request could not reach the endpoint or got no valid answer (answer 503/502)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def tunnel_socket(
    stream_relay: Callable[[socket.socket], asyncio.Task[object]],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A socket pair: one end handed to ``stream_relay``, streams on the other."""
    a, b = socket.socketpair()
    stream_relay(a)
    return await asyncio.open_connection(sock=b)


@dataclass(eq=False)
class _Conn:
    endpoint: Endpoint
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    relay: asyncio.Task[object]
    http: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()
        if not self.relay.done():
            self.relay.cancel()

    @property
    def reusable(self) -> bool:
        return (
            self.http.our_state is h11.IDLE
            and self.http.their_state is h11.IDLE
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )


class UpstreamResponse:
    """Status and headers of an upstream answer; the body streams from :meth:`chunks`."""

    def __init__(self, upstream: Upstream, conn: _Conn, head: h11.Response) -> None:
        self._up = upstream
        self._conn = conn
        self.status = head.status_code
        self.headers: list[tuple[bytes, bytes]] = list(head.headers)
        self.bytes = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        try:
            while True:
                event = await self._up._next(conn)
                if isinstance(event, h11.Data):
                    self.bytes += len(event.data)
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
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
        body: bytes,
        forwarded_for: tuple[str, int] | None = None,
    ) -> UpstreamResponse:
        """Sends one request; returns once the response head arrived."""
        conn = self._take_idle(endpoint) or await self._open(endpoint, forwarded_for)
        try:
            data = conn.http.send(h11.Request(method=method, target=target, headers=list(headers)))
            if body:
                data += conn.http.send(h11.Data(data=body)) or b""
            data += conn.http.send(h11.EndOfMessage()) or b""
            conn.writer.write(data or b"")
            await conn.writer.drain()
            while True:
                event = await self._next(conn)
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    return UpstreamResponse(self, conn, event)
                raise UpstreamError(502, f"unexpected upstream event {type(event).__name__}")
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError) as e:
            conn.close()
            self._live.discard(conn)
            raise UpstreamError(502, f"upstream {endpoint.ip}:{endpoint.port} failed: {e}") from e
        except BaseException:
            conn.close()
            self._live.discard(conn)
            raise

    async def _next(self, conn: _Conn) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = conn.http.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(self._response_timeout):
                    data = await conn.reader.read(_READ)
                conn.http.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamError(502, "the upstream closed the connection mid-exchange")
            return cast("h11.Event | type[h11.PAUSED]", event)

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

    async def _open(self, endpoint: Endpoint, forwarded_for: tuple[str, int] | None) -> _Conn:
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
        tasks: list[asyncio.Task[object]] = []

        def start(sock: socket.socket) -> asyncio.Task[object]:
            task: asyncio.Task[object] = asyncio.get_running_loop().create_task(relay(stream, sock))
            tasks.append(task)
            return task

        reader, writer = await tunnel_socket(start)
        conn = _Conn(endpoint, reader, writer, tasks[0])
        self._live.add(conn)
        self.opened += 1
        return conn

    def _release(self, conn: _Conn) -> None:
        if conn.http.our_state is h11.DONE and conn.http.their_state is h11.DONE:
            with contextlib.suppress(h11.ProtocolError):
                conn.http.start_next_cycle()
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
