"""HTTP/1.1 inside a tunnel: h11 parses, :class:`~waypoint.forward.RequestProxy` decides.

Keep-alive is served; pipelined requests are answered one after the other, in
order (h11 holds the next request's bytes until the current response is
done). Chunked and length-delimited bodies are read whole, up to the
proxy's ``max_body`` (else 413). Malformed requests get a 400 and the
connection closes; a CONNECT inside the tunnel gets 405; nothing a client
sends raises out of :func:`serve_http1`. Idle keep-alive connections close
after ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from http import HTTPStatus

import h11

from .forward import RequestProxy, TunnelContext

__all__ = ["serve_http1"]

log = logging.getLogger("veil.waypoint.http1")


def _reason(status: int) -> bytes:
    """The standard reason phrase. HTTP/1.1 allows an empty one, but some
    clients (llhttp-based ones such as h2load) only record the status when a
    reason phrase is present."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_READ = 64 * 1024
_MAX_HEAD = 64 * 1024
_COALESCE = 64 * 1024


class _Closed(Exception):
    pass


class _Sink:
    """Writes a response, coalescing head, body and end into as few writes as
    fit in :data:`_COALESCE` bytes: each write becomes an HBONE DATA frame and
    a TLS record, so a small response goes out as one."""

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> None:
        self._conn = conn
        self._writer = writer
        self._out: list[bytes] = []
        self._size = 0

    async def start(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self._write(h11.Response(status_code=status, headers=list(headers), reason=_reason(status)))

    async def data(self, chunk: bytes) -> None:
        if chunk:
            self._write(h11.Data(data=chunk))
            if self._size >= _COALESCE:
                await self._flush()

    async def end(self) -> None:
        self._write(h11.EndOfMessage())
        await self._flush()

    def _write(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            self._out.append(data)
            self._size += len(data)

    async def _flush(self) -> None:
        out, self._out, self._size = self._out, [], 0
        if out:
            self._writer.write(b"".join(out))
        await self._writer.drain()


def _host_and_target(request: h11.Request) -> tuple[str, str] | None:
    target = request.target.decode("latin-1")
    host = ""
    for name, value in request.headers:
        if name == b"host":
            host = value.decode("latin-1")
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        authority, slash, path = rest.partition("/")
        return authority or host, "/" + path if slash else "/"
    if not target.startswith("/"):
        return None
    return host, target


async def serve_http1(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ctx: TunnelContext,
    proxy: RequestProxy,
    first: bytes = b"",
    *,
    idle_timeout: float = 300.0,
) -> None:
    """Serves requests until the client or the protocol closes the connection."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
    conn.receive_data(first)
    sink = _Sink(conn, writer)

    async def next_event() -> h11.Event:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(idle_timeout):
                        data = await reader.read(_READ)
                except (TimeoutError, OSError):
                    raise _Closed from None
                conn.receive_data(data)
                continue
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                raise _Closed
            assert isinstance(event, h11.Event)
            return event

    async def simple(status: int, text: str) -> None:
        body = text.encode()
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        with contextlib.suppress(h11.LocalProtocolError, OSError):
            writer.write(
                conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
                or b""
            )
            writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()

    try:
        while True:
            event = await next_event()
            if not isinstance(event, h11.Request):
                break
            method = event.method.decode("latin-1")
            if method == "CONNECT":
                await simple(405, "CONNECT is not served inside a waypoint tunnel\n")
                break
            parsed = _host_and_target(event)
            if parsed is None:
                await simple(400, "bad request target\n")
                break
            host, target = parsed
            body = bytearray()
            too_big = False
            while True:
                part = await next_event()
                if isinstance(part, h11.Data):
                    if len(body) + len(part.data) > proxy.max_body:
                        too_big = True
                        break
                    body += part.data
                elif isinstance(part, h11.EndOfMessage):
                    break
            if too_big:
                await simple(413, "request body too large\n")
                break
            await proxy.serve(ctx, method, target, host, event.headers, bytes(body), "http", sink)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
    except h11.RemoteProtocolError as e:
        log.info("malformed HTTP/1.1 from %s: %s", ctx.peer.principal, e)
        await simple(e.error_status_hint or 400, f"bad request: {e}\n")
    except (_Closed, ConnectionError):
        pass
    except h11.LocalProtocolError as e:
        log.info("HTTP/1.1 connection from %s ended: %s", ctx.peer.principal, e)
    finally:
        with contextlib.suppress(OSError):
            writer.close()
