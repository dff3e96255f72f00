"""The operations endpoints' HTTP server on loopback: routing, HEAD, streaming,
and malformed or oversized requests answered (never a crash)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ztunnel.admin.http import MAX_BODY, HttpServer, Request, Response, text_response


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[HttpServer, int]]:
    async def hello(request: Request) -> Response:
        return text_response(f"hello {request.query.get('name', '')}\n")

    async def echo(request: Request) -> Response:
        return Response(200, request.body, "application/octet-stream")

    async def boom(request: Request) -> Response:
        raise RuntimeError("handler bug")

    async def stream(request: Request) -> Response:
        async def lines() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"{i}\n".encode()

        return Response(200, lines(), "application/x-ndjson")

    routes = {
        "/hello": {"GET": hello},
        "/echo": {"POST": echo},
        "/boom": {"GET": boom},
        "/stream": {"GET": stream},
    }
    srv = HttpServer("test", routes)
    _host, port = await srv.start("127.0.0.1", 0)
    try:
        yield srv, port
    finally:
        await srv.close()


async def test_get_with_query(server: tuple[HttpServer, int]) -> None:
    out = await _exchange(server[1], b"GET /hello?name=veil HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 11\r\n" in out and b"Connection: close\r\n" in out
    assert out.endswith(b"\r\n\r\nhello veil\n")


async def test_head_has_no_body(server: tuple[HttpServer, int]) -> None:
    out = await _exchange(server[1], b"HEAD /hello HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\n")


async def test_post_body(server: tuple[HttpServer, int]) -> None:
    out = await _exchange(server[1], b"POST /echo HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nabcd")


async def test_not_found_and_method(server: tuple[HttpServer, int]) -> None:
    assert (await _exchange(server[1], b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
    out = await _exchange(server[1], b"DELETE /hello HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD\r\n" in out


async def test_handler_error_is_500_and_server_lives(server: tuple[HttpServer, int]) -> None:
    assert (await _exchange(server[1], b"GET /boom HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500 ")
    assert (await _exchange(server[1], b"GET /hello HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")


async def test_streamed_body(server: tuple[HttpServer, int]) -> None:
    out = await _exchange(server[1], b"GET /stream HTTP/1.1\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Content-Length" not in head and body == b"0\n1\n2\n"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /hello HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"POST /echo HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
        (b"POST /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
        (f"POST /echo HTTP/1.1\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode(), b"413"),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", b"400"),
        (b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", b"400"),
        (b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"400"),
        (b"GET /hello HTTP/1.1\r\nHost : x\r\n\r\n", b"400"),
        (b"GET /hello HTTP/1.1\nHost: x\n\n", b"400"),
        (b"GET /hello HTTP/1.1\r\nX: a\r\n b\r\n\r\n", b"400"),
    ],
)
async def test_malformed_requests(
    server: tuple[HttpServer, int], raw: bytes, status: bytes
) -> None:
    if raw.endswith(b"short"):
        # A body shorter than announced: the client half-closes, the server answers 400.
        reader, writer = await asyncio.open_connection("127.0.0.1", server[1])
        writer.write(raw)
        writer.write_eof()
        out = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    else:
        out = await _exchange(server[1], raw)
    assert out.startswith(b"HTTP/1.1 " + status + b" "), out[:80]
