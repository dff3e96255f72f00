"""A small HTTP/1.1 server for the operations endpoints (admin, metrics, readiness).

The endpoints answer a handful of GETs (and one POST) from ``veilctl``, the
kubelet and Prometheus, one request per connection. A general web framework
costs the ztunnel about 13 MB of resident memory per process for features
these endpoints never use, so this module does just what they need:

- a request line, headers and a ``Content-Length`` body, each bounded in size
  and time; anything else is answered 400 (or 413/501) and the connection closed;
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


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # latin-1 decodes every byte; kept for clarity
        raise _BadRequest(400, "undecodable request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], headers


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
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, headers = _parse_head(head[:-4])
        if "transfer-encoding" in headers:
            raise _BadRequest(501, "chunked request bodies are not supported; send Content-Length")
        body = b""
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise _BadRequest(400, "Content-Length is not a number") from None
            if length < 0:
                raise _BadRequest(400, "Content-Length is negative")
            if length > MAX_BODY:
                raise _BadRequest(413, f"request body over {MAX_BODY} bytes")
            body = await reader.readexactly(length)
        url = urlsplit(target)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        return Request(method, url.path or "/", query, headers, body)

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
