"""A small HTTP/1.1 server for the operations endpoints (admin, metrics, readiness).

The endpoints answer a handful of GETs (and one POST) from ``veilctl``, the
kubelet and Prometheus, one request per connection. A general web framework
costs the ztunnel about 13 MB of resident memory per process for features
these endpoints never use, so this module does just what they need:

- a request line, headers and a ``Content-Length`` body, parsed by llhttp
  (``httptools``, strict) and bounded in size and time; anything else is
  answered 400 (or 413/501) and the connection closed;
- routes by exact path and method, with ``HEAD`` wherever ``GET`` is allowed,
  405 with ``Allow`` for another method and 404 for an unknown path;
- a handler returns a :class:`Response`, whose body is bytes or an async
  iterator of bytes (streamed until it ends or the reader goes away);
- every response carries ``Connection: close``.

A handler that raises is answered 500 and logged; it never takes the listener down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

import httptools

__all__ = ["Handler", "HttpServer", "Request", "Response", "json_response", "text_response"]

log = logging.getLogger("veil.ztunnel.admin")

MAX_HEAD = 16 * 1024  # request line and headers
MAX_BODY = 64 * 1024  # the only body taken is a small JSON document
READ_TIMEOUT = 10.0  # a client that does not finish its request in time is dropped


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes = b""


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes | AsyncIterator[bytes] = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


def text_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode())


def json_response(data: object, status: int = 200) -> Response:
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    return Response(status, text.encode(), "application/json; charset=utf-8")


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Parsed:
    """llhttp callbacks (``httptools``): one request, sizes bounded as it streams."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.head_size = 0
        self.body = bytearray()
        self.done = False

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        if key in self.headers and key in ("content-length", "host"):
            raise _BadRequest(400, f"two {key} headers")
        self.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if "transfer-encoding" in self.headers:
            raise _BadRequest(501, "chunked request bodies are not supported; send Content-Length")
        length = self.headers.get("content-length", "0")
        if length.isdigit() and int(length) > MAX_BODY:
            raise _BadRequest(413, f"request body over {MAX_BODY} bytes")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True

    def _count(self, n: int) -> None:
        self.head_size += n
        if self.head_size > MAX_HEAD:
            raise _BadRequest(400, f"request head over {MAX_HEAD} bytes")


class HttpServer:
    """One listener; ``routes`` maps a path to ``{method: handler}``."""

    def __init__(self, name: str, routes: dict[str, dict[str, Handler]]) -> None:
        self.name = name
        self._routes = routes
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listens (SO_REUSEADDR and SO_REUSEPORT) and returns the bound address."""
        self._server = await asyncio.start_server(
            self._serve, host, port, reuse_address=True, reuse_port=True, limit=MAX_HEAD
        )
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stops listening and closes every open connection (streams included)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            with contextlib.suppress(ConnectionError, TimeoutError):
                await self._one(reader, writer)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(self._read(reader), READ_TIMEOUT)
        except _BadRequest as e:
            await self._send(writer, "", Response(e.status, f"{e}\n".encode()))
            return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            await self._send(writer, "", Response(400, b"malformed or oversized request\n"))
            return
        response = await self._dispatch(request)
        await self._send(writer, request.method, response)

    async def _read(self, reader: asyncio.StreamReader) -> Request:
        parsed = _Parsed()
        parser = httptools.HttpRequestParser(parsed)
        while not parsed.done:
            data = await reader.read(MAX_HEAD)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                raise _BadRequest(400, "protocol upgrades are not served here") from None
            except httptools.HttpParserCallbackError as e:
                cause = e.__context__
                if isinstance(cause, _BadRequest):
                    raise cause from None
                raise _BadRequest(400, "malformed request") from None
            except httptools.HttpParserError as e:
                raise _BadRequest(400, f"malformed request: {e}") from None
        url = urlsplit(parsed.url.decode("latin-1"))
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        method = parser.get_method().decode("ascii", "replace")
        return Request(method, url.path or "/", query, parsed.headers, bytes(parsed.body))

    async def _dispatch(self, request: Request) -> Response:
        methods = self._routes.get(request.path)
        if methods is None:
            return Response(404, b"404: Not Found\n")
        method = "GET" if request.method == "HEAD" and "GET" in methods else request.method
        handler = methods.get(method)
        if handler is None:
            allow = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            return Response(405, b"405: Method Not Allowed\n", headers={"Allow": ", ".join(allow)})
        try:
            return await handler(request)
        except Exception:
            log.exception("%s endpoint: %s %s failed", self.name, request.method, request.path)
            return Response(500, b"500: Internal Server Error\n")

    async def _send(self, writer: asyncio.StreamWriter, method: str, response: Response) -> None:
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = "Status"
        lines = [f"HTTP/1.1 {response.status} {reason}", f"Content-Type: {response.content_type}"]
        body = response.body
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in response.headers.items()]
        lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method == "HEAD":
            if not isinstance(body, bytes):
                await _close_iterator(body)
            await writer.drain()
            return
        if isinstance(body, bytes):
            writer.write(body)
            await writer.drain()
            return
        # A stream ends when its source does, or when the reader goes away.
        try:
            await writer.drain()
            async for chunk in body:
                writer.write(chunk)
                await writer.drain()
        finally:
            await _close_iterator(body)


async def _close_iterator(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
