"""The waypoint's HTTP/1.1 framing (waypoint/h1.py): tables of requests and responses."""

from __future__ import annotations

import pytest

from waypoint.body import RequestError
from waypoint.h1 import (
    LAST_CHUNK,
    H1Error,
    H1Request,
    H1Response,
    RequestParser,
    ResponseParser,
    chunk,
    request_bytes,
    response_head,
)

MAX_BODY = 1024


def parse(*pieces: bytes) -> list[tuple[str, str, bytes, bool]]:
    """Feeds everything, then reads each request's body (all of it was fed)."""
    p = RequestParser(max_body=MAX_BODY)
    reqs = []
    for piece in pieces:
        reqs += p.feed(piece)
    out = []
    for r in reqs:
        assert r.body.complete, "the whole body was fed"
        out.append((r.method, r.target, r.body.take_ready(), r.keep_alive))
    return out


def test_keep_alive_pipelining_and_byte_at_a_time() -> None:
    raw = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )
    want = [("GET", "/a", b"", True), ("POST", "/b", b"abc", True), ("PUT", "/c", b"hi", True)]
    assert parse(raw) == want
    assert parse(*(raw[i : i + 1] for i in range(len(raw)))) == want


def test_header_names_are_lower_cased_and_values_kept() -> None:
    p = RequestParser(max_body=MAX_BODY)
    (req,) = p.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Thing: A b\r\n\r\n")
    assert req.headers == [(b"host", b"x"), (b"x-thing", b"A b")]


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    ],
)
def test_connection_semantics(raw: bytes, keep_alive: bool) -> None:
    assert parse(raw)[0][3] is keep_alive


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        # Smuggling forms: ambiguous framing is an error, never a guess.
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),  # space before colon
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01Name: y\r\n\r\n", 400),
        (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 405),
        (b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
    ],
)
def test_malformed_requests_name_the_status(raw: bytes, status: int) -> None:
    with pytest.raises(H1Error) as err:
        parse(raw)
    assert err.value.status == status
    assert err.value.detail


def test_chunked_body_over_the_limit_is_413_and_fails_the_body() -> None:
    p = RequestParser(max_body=MAX_BODY)
    (req,) = p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert req.body.length is None
    with pytest.raises(H1Error) as err:
        for _ in range(4):
            p.feed(b"200\r\n" + b"a" * 512 + b"\r\n")
    assert err.value.status == 413
    with pytest.raises(RequestError) as body_err:
        req.body.take_ready()
    assert body_err.value.status == 413


async def test_a_body_streams_as_the_connection_is_read() -> None:
    """The head comes out first; the body is filled on demand by ``fill``."""
    pieces = [b"he", b"llo ", b"world"]
    heads: list[H1Request] = []

    async def fill() -> None:
        if pieces:
            heads.extend(p.feed(pieces.pop(0)))
        else:
            p.eof()

    p = RequestParser(fill=fill)
    (req,) = p.feed(
        b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
    )
    assert req.expect_continue and req.body.length == 11 and not req.body.complete
    got = b""
    while data := await req.body.read():
        got += data
    assert got == b"hello world" and req.body.done and heads == []


async def test_a_body_cut_by_the_client_fails_instead_of_ending() -> None:
    async def fill() -> None:
        p.eof()

    p = RequestParser(fill=fill)
    (req,) = p.feed(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert await req.body.read() == b"abc"
    with pytest.raises(ConnectionResetError):
        await req.body.read()


def test_an_upgrade_request_keeps_what_followed_it_and_ends_http() -> None:
    p = RequestParser(max_body=MAX_BODY)
    (req,) = p.feed(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    )
    assert req.target == "/ws" and req.keep_alive is False and p.closed
    assert req.upgrade == b"websocket" and p.upgrade_tail == b"\x81\x00"
    assert p.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == []


def test_an_upgrade_header_without_connection_upgrade_is_a_plain_request() -> None:
    p = RequestParser(max_body=MAX_BODY)
    (req,) = p.feed(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
    assert req.upgrade is None and req.keep_alive and not p.closed


def test_a_101_is_an_answer_only_to_an_upgrade_request() -> None:
    raw = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x02hi"
    )
    p = ResponseParser()
    p.start("GET", upgrade=True)
    (head,) = p.feed(raw)
    assert isinstance(head, H1Response) and head.status == 101
    assert p.upgraded_tail == b"\x81\x02hi" and not p.reusable
    unasked = ResponseParser()
    unasked.start("GET")
    with pytest.raises(ValueError, match="unasked"):
        unasked.feed(raw)


@pytest.mark.parametrize(
    ("status", "headers", "method", "version", "keep_alive", "chunked", "close"),
    [
        (200, [(b"content-length", b"2")], "GET", "1.1", True, False, False),
        (200, [], "GET", "1.1", True, True, False),
        (200, [], "GET", "1.0", True, False, True),  # HTTP/1.0: close-delimited
        (200, [], "HEAD", "1.1", True, False, False),
        (204, [], "GET", "1.1", True, False, False),
        (304, [], "GET", "1.1", True, False, False),
        (200, [(b"content-length", b"2")], "GET", "1.1", False, False, True),
    ],
)
def test_response_framing(
    status: int,
    headers: list[tuple[bytes, bytes]],
    method: str,
    version: str,
    keep_alive: bool,
    chunked: bool,
    close: bool,
) -> None:
    head, is_chunked, is_close = response_head(
        status, headers, method=method, version=version, keep_alive=keep_alive
    )
    assert (is_chunked, is_close) == (chunked, close)
    assert head.startswith(b"HTTP/1.1 %d " % status) and head.endswith(b"\r\n\r\n")
    assert (b"transfer-encoding: chunked\r\n" in head) is chunked
    assert (b"connection: close\r\n" in head) is close


@pytest.mark.parametrize("value", [b"a\r\nSet-Cookie: x", b"a\nb", b"a\0b"])
def test_written_headers_never_split_a_message(value: bytes) -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        response_head(200, [(b"x", value)], method="GET", version="1.1", keep_alive=True)
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        request_bytes("GET", "/", [(b"host", b"h"), (b"x", value)], b"")
    with pytest.raises(ValueError, match="whitespace or control"):
        request_bytes("GET", "/a b", [(b"host", b"h")], b"")


def test_chunk_encoding() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n" and LAST_CHUNK == b"0\r\n\r\n"


def responses(method: str, *pieces: bytes, eof: bool = False) -> list[object]:
    p = ResponseParser()
    p.start(method)
    out: list[object] = []
    for piece in pieces:
        out += p.feed(piece)
    if eof:
        out += p.feed_eof()
    return [(e.status, e.headers) if isinstance(e, H1Response) else e for e in out]


def test_response_bodies_by_length_chunks_and_eof() -> None:
    assert responses("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi") == [
        (200, [(b"content-length", b"2")]),
        b"hi",
        None,
    ]
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    assert responses("GET", raw)[1:] == [b"hi", None]
    assert responses("GET", b"HTTP/1.1 200 OK\r\n\r\nuntil", b" eof", eof=True)[1:] == [
        b"until",
        b" eof",
        None,
    ]


def test_informational_responses_are_skipped_and_head_answers_have_no_body() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    assert responses("POST", raw) == [(201, [(b"content-length", b"0")]), None]
    assert responses("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n") == [
        (200, [(b"content-length", b"99")]),
        None,
    ]


def test_reuse_follows_the_response() -> None:
    p = ResponseParser()
    p.start("GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert p.reusable
    p.start("GET")
    p.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
    assert not p.reusable


@pytest.mark.parametrize(
    ("pieces", "eof"),
    [
        ((b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",), True),  # cut short
        ((b"NOT HTTP\r\n\r\n",), False),
        ((b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",), False),
        ((b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",), False),
    ],
)
def test_broken_responses_raise(pieces: tuple[bytes, ...], eof: bool) -> None:
    with pytest.raises(ValueError):
        responses("GET", *pieces, eof=eof)
