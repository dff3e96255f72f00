"""HTTP/1.1 inside a tunnel: :mod:`.h1` frames, :class:`~waypoint.forward.RequestProxy` decides.

Keep-alive is served; pipelined requests are answered one after the other, in
order. A request is decided on its head and its body (chunked or
length-delimited) streams upstream as it arrives, so uploads of any size pass
in bounded memory (``max_body``, when set, answers 413 past it). A client
that sent ``Expect: 100-continue`` gets its ``100 Continue`` only when the
proxy starts reading the body, so a refused request never uploads it. A body
nobody read (a refused request) closes the connection after the answer.
Malformed requests get a 400 (431 for a huge head, 405 for a CONNECT, 505
for another HTTP version) and the connection closes; nothing a client sends
raises out of :func:`serve_http1`. Idle keep-alive connections close after
``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from .body import RequestError
from .forward import Headers, RequestProxy, TunnelContext
from .h1 import LAST_CHUNK, H1Request, RequestParser, chunk, response_head
from .upstream import UpstreamError

__all__ = ["serve_http1"]

log = logging.getLogger("veil.waypoint.http1")

_READ = 64 * 1024
_COALESCE = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Sink:
    """Writes one response, coalescing head, body and end into as few writes as
    fit in :data:`_COALESCE` bytes: each write becomes an HBONE DATA frame and a
    TLS record, so a small response goes out as one."""

    __slots__ = (
        "_chunked",
        "_out",
        "_parser",
        "_reader",
        "_req",
        "_size",
        "_writer",
        "close",
        "started",
    )

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        req: H1Request,
        reader: asyncio.StreamReader,
        parser: RequestParser,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._parser = parser
        self._req = req
        self._out: list[bytes] = []
        self._size = 0
        self._chunked = False
        self.close = not req.keep_alive
        self.started = False

    async def start(self, status: int, headers: Headers) -> None:
        head, self._chunked, close = response_head(
            status,
            headers,
            method=self._req.method,
            version=self._req.version,
            keep_alive=self._req.keep_alive,
        )
        self.started = True
        self.close = close
        self._out.append(head)
        self._size += len(head)

    async def data(self, data: bytes) -> None:
        if not data or self._req.method == "HEAD":
            return
        piece = chunk(data) if self._chunked else data
        self._out.append(piece)
        self._size += len(piece)
        if self._size >= _COALESCE:
            await self._flush()

    async def end(self, trailers: Headers = ()) -> None:
        # Trailers are dropped: HTTP/1.1 clients of a mesh do not use them.
        if self._chunked:
            self._out.append(LAST_CHUNK)
        await self._flush()

    def upgrade_protocol(self) -> bytes | None:
        return self._req.upgrade

    async def switch(
        self, headers: Headers
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        self.started = True
        self.close = True
        head = b"HTTP/1.1 101 Switching Protocols\r\n" + b"".join(
            b"%s: %s\r\n" % (n, v) for n, v in headers if b"\r" not in v and b"\n" not in v
        )
        self._writer.write(head + b"\r\n")
        await self._writer.drain()
        return self._reader, self._writer, self._parser.upgrade_tail

    async def _flush(self) -> None:
        out, self._out, self._size = self._out, [], 0
        if out:
            self._writer.write(b"".join(out) if len(out) > 1 else out[0])
        await self._writer.drain()


def _host_and_target(req: H1Request) -> tuple[str, str] | None:
    target = req.target
    host = next((v.decode("latin-1") for n, v in req.headers if n == b"host"), "")
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        authority, slash, path = rest.partition("/")
        return authority or host, "/" + path if slash else "/"
    if not target.startswith("/"):
        return None
    return host, target


async def _simple(writer: asyncio.StreamWriter, status: int, text: str) -> None:
    """A plain-text answer that closes the connection (errors only)."""
    body = text.encode()
    head, _, _ = response_head(
        status,
        [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        method="GET",
        version="1.1",
        keep_alive=False,
    )
    with contextlib.suppress(OSError, RuntimeError):
        writer.write(head + body)
        await writer.drain()


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
    pending: deque[H1Request] = deque()

    async def fill() -> None:
        """Reads once and parses it: a body that waits for the client calls this."""
        try:
            async with asyncio.timeout(idle_timeout):
                data = await reader.read(_READ)
        except TimeoutError:
            data = b""
        if not data:
            parser.eof()
            return
        pending.extend(parser.feed(data))

    parser = RequestParser(max_body=proxy.max_body, fill=fill)
    sink: _Sink | None = None
    try:
        if first:
            pending.extend(parser.feed(first))
        while True:
            if not pending:
                if parser.closed:
                    break
                await fill()
                continue
            req = pending.popleft()
            parsed = _host_and_target(req)
            if parsed is None:
                await _simple(writer, 400, "bad request target\n")
                break
            if req.expect_continue and not req.body.done:
                req.body.on_first_read = lambda: writer.write(_CONTINUE)
            sink = _Sink(writer, req, reader, parser)
            try:
                await proxy.serve(
                    ctx, req.method, parsed[1], parsed[0], req.headers, req.body, "http", sink
                )
            except UpstreamError:
                break  # it broke off mid-body: closing tells the client
            except ValueError as e:
                # A header value that would split the response (CR/LF/NUL).
                log.warning("waypoint: cannot relay a response to %s: %s", ctx.peer.principal, e)
                if not sink.started:
                    await _simple(writer, 502, "invalid upstream response\n")
                break
            if sink.close or not req.body.done:
                # A body nobody read (the request was refused, or answered
                # early) would have to be skipped byte by byte: close instead.
                break
            sink = None
    except RequestError as e:
        log.info("malformed HTTP/1.1 from %s: %s", ctx.peer.principal, e.detail)
        if sink is None or not sink.started:
            await _simple(writer, e.status, f"bad request: {e.detail}\n")
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()
