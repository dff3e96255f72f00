"""HTTP/1.1 framing for the waypoint, sans IO: llhttp (``httptools``) parses, this module frames.

Both directions of the waypoint speak HTTP/1.1 through this module:

* :class:`RequestParser` turns the bytes a client sends into
  :class:`H1Request` heads as soon as a head is complete (pipelined requests
  come out in order), each with a streaming
  :class:`~waypoint.body.RequestBody` the parser keeps filling, or raises
  :class:`H1Error` with the status to answer (400, 405, 413, 431, 505);
  llhttp runs strict, so ambiguous framing (``Content-Length`` with
  ``Transfer-Encoding``, two different lengths, bare LF, obs-fold) is an
  error, never a guess;
* :func:`response_head` / :func:`chunk` / :data:`LAST_CHUNK` write a
  response, choosing its framing (length, chunked, or close-delimited for an
  HTTP/1.0 client) from the status, the method and the headers;
* :func:`request_bytes` and :class:`ResponseParser` are the client side the
  upstream uses. llhttp cannot be told that a response answers a HEAD or
  ends at EOF, so the parser handles those two cases itself.

Names of parsed headers are lower-cased (HTTP/1.1 names are case-insensitive,
HTTP/2 requires lower case). Header values this module writes are checked
for CR, LF and NUL: a value that would split a message raises ValueError.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus

import httptools

from .body import RequestBody, RequestError

__all__ = [
    "LAST_CHUNK",
    "H1Error",
    "H1Request",
    "H1Response",
    "RequestParser",
    "ResponseParser",
    "chunk",
    "request_bytes",
    "response_head",
]

Headers = Sequence[tuple[bytes, bytes]]
LAST_CHUNK = b"0\r\n\r\n"
MAX_HEAD = 64 * 1024
MAX_HEADERS = 128
_FORBIDDEN = (b"\r", b"\n", b"\0")
_NO_BODY = frozenset({204, 304})


class H1Error(RequestError):
    """The client's bytes are not acceptable HTTP/1.1: answer ``status`` and close."""


class H1Request:
    """One request: method, target as sent, lower-cased headers, and its body
    (streaming: complete only once the parser saw its end)."""

    __slots__ = (
        "body",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = RequestBody.empty()
        self.keep_alive = True
        self.expect_continue = False
        # The protocol an ``Upgrade`` request asks for (``Connection: upgrade``
        # too), e.g. b"websocket"; the bytes after it are in ``upgrade_tail``.
        self.upgrade: bytes | None = None


class H1Response:
    """A response head from upstream; the body comes as chunks from :class:`ResponseParser`."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers


def _reason(status: int) -> bytes:
    # Some clients (llhttp-based ones such as h2load) only record a status
    # when a reason phrase is present, so always send the standard one.
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def _check(value: bytes) -> bytes:
    for bad in _FORBIDDEN:
        if bad in value:
            raise ValueError(f"header field {value[:40]!r} contains CR, LF or NUL")
    return value


class _Head:
    """Counts what a message head costs while llhttp streams it, so a huge
    head is refused (431) before it is buffered."""

    __slots__ = ("count", "size")

    def __init__(self) -> None:
        self.size = 0
        self.count = 0

    def add(self, n: int, limit: int) -> None:
        self.size += n
        if self.size > limit:
            raise H1Error(431, f"the request head is larger than {limit} bytes")


class RequestParser:
    """Bytes in, request heads out, bodies filled as they come. One instance
    per client connection; ``fill`` (read the connection once and
    :meth:`feed` it) is what a body awaits when it has nothing queued."""

    def __init__(
        self,
        *,
        max_body: int = 0,
        max_head: int = MAX_HEAD,
        max_headers: int = MAX_HEADERS,
        fill: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._p = httptools.HttpRequestParser(self)
        self._max_body = max_body  # 0: no limit
        self._max_head = max_head
        self._max_headers = max_headers
        self._fill = fill
        self._done: list[H1Request] = []
        self._cur = H1Request()
        self._url = bytearray()
        self._head = _Head()
        self._in_head = False
        self._in_body = False
        self.closed = False  # no more requests on this connection (upgrade / close)
        self.upgrade_tail = b""  # what the client sent after an Upgrade request

    # -- llhttp callbacks (names fixed by httptools) ------------------------------

    def on_message_begin(self) -> None:
        self._cur = H1Request()
        self._url.clear()
        self._head = _Head()
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._head.add(len(url), self._max_head)
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        head.add(len(name) + len(value) + 4, self._max_head)
        head.count += 1
        if head.count > self._max_headers:
            raise H1Error(431, f"the request has more than {self._max_headers} header fields")
        self._cur.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        cur = self._cur
        p = self._p
        self._in_head = False
        cur.method = p.get_method().decode("ascii", "replace")
        cur.version = p.get_http_version()
        cur.keep_alive = p.should_keep_alive()
        cur.target = self._url.decode("latin-1")
        if cur.version not in ("1.1", "1.0"):
            raise H1Error(505, f"HTTP/{cur.version} is not served; use HTTP/1.1")
        if cur.method == "CONNECT":
            raise H1Error(405, "CONNECT is not served inside a waypoint tunnel")
        hosts = [v for n, v in cur.headers if n == b"host"]
        if len(hosts) > 1:
            raise H1Error(400, "the request has more than one Host header")
        if cur.version == "1.1" and not hosts:
            raise H1Error(400, "an HTTP/1.1 request needs a Host header")
        length: int | None = 0
        for name, value in cur.headers:
            if name == b"content-length" and value.strip().isdigit():
                length = int(value)
                if self._max_body and length > self._max_body:
                    raise H1Error(413, f"the request body is larger than {self._max_body} bytes")
            elif name == b"transfer-encoding":
                length = None  # llhttp accepts only chunked as the final coding
            elif name == b"expect" and value.strip().lower() == b"100-continue":
                cur.expect_continue = cur.version == "1.1"
        cur.body = RequestBody(length, fill=self._fill, max_size=self._max_body)
        self._in_body = not cur.body.complete
        self._done.append(cur)

    def on_body(self, body: bytes) -> None:
        b = self._cur.body
        b.push(body)
        if b.done and not b.complete:  # over max_size: stop parsing this connection
            raise H1Error(413, f"the request body is larger than {self._max_body} bytes")

    def on_message_complete(self) -> None:
        self._in_body = False
        self._cur.body.finish()

    # -- input -------------------------------------------------------------------

    def feed(self, data: bytes) -> list[H1Request]:
        """The request heads ``data`` completed, in order (their bodies fill as
        parsing goes on); raises :class:`H1Error`, which also fails the body
        being read."""
        if self.closed:
            return []
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # An Upgrade request (websocket): what follows it is not HTTP/1.1.
            # It is relayed as is if the upstream switches (101); otherwise
            # the request is answered as a plain one and the connection closes.
            self.closed = True
            cur = self._cur
            cur.keep_alive = False
            cur.upgrade = next((v for n, v in cur.headers if n == b"upgrade"), None)
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            self.upgrade_tail = bytes(data[offset:])
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__ or e.__cause__
            err = cause if isinstance(cause, H1Error) else H1Error(400, f"malformed request: {e}")
            raise self._failed(err) from None
        except H1Error as e:
            raise self._failed(e) from None
        except httptools.HttpParserError as e:
            if self._in_head and self._head.size > self._max_head:
                raise self._failed(H1Error(431, "the request head is too large")) from None
            raise self._failed(H1Error(400, f"malformed request: {e}")) from None
        done, self._done = self._done, []
        return done

    def _failed(self, err: H1Error) -> H1Error:
        self.closed = True
        if self._in_body:
            self._cur.body.fail(err)
        return err

    def eof(self) -> None:
        """The client closed: a body still expected fails (nothing is made up)."""
        self.closed = True
        if self._in_body:
            self._cur.body.fail(ConnectionResetError("the client closed before the body ended"))


def response_head(
    status: int,
    headers: Headers,
    *,
    method: str,
    version: str,
    keep_alive: bool,
) -> tuple[bytes, bool, bool]:
    """``(head bytes, chunked, close)`` for a response to a request.

    ``headers`` carry no hop-by-hop fields except ``content-length``. A
    response with a length keeps it; one without gets chunked framing for an
    HTTP/1.1 client and close-delimited framing for an HTTP/1.0 one. HEAD
    answers, 1xx, 204 and 304 have no body.
    """
    has_length = any(n.lower() == b"content-length" for n, _ in headers)
    bodyless = method == "HEAD" or status in _NO_BODY or status < 200
    chunked = not has_length and not bodyless and version == "1.1"
    close = not keep_alive or (not has_length and not bodyless and not chunked)
    out = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
    out += [b"%s: %s\r\n" % (_check(n), _check(v)) for n, v in headers]
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out), chunked, close


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never the last one: that is :data:`LAST_CHUNK`)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def request_bytes(method: str, target: str, headers: Headers, body: bytes) -> bytes:
    """A whole HTTP/1.1 request; ``headers`` include Host and, with a body, Content-Length."""
    if " " in target or any(c in target for c in "\r\n\0"):
        raise ValueError(f"request target {target[:60]!r} contains whitespace or control bytes")
    out = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    out += [b"%s: %s\r\n" % (_check(n), _check(v)) for n, v in headers]
    out.append(b"\r\n")
    if body:
        out.append(body)
    return b"".join(out)


class ResponseParser:
    """Client side: bytes in, a response head then its body chunks out.

    :meth:`start` is called before each request's response with that
    request's method. :meth:`feed` returns events: an :class:`H1Response`,
    ``bytes`` body chunks, then ``None`` when the response is complete.
    Informational (1xx) responses are skipped. :meth:`feed_eof` ends a
    close-delimited body (and raises if the response was cut short).
    """

    def __init__(self, *, max_head: int = MAX_HEAD) -> None:
        self._max_head = max_head
        self._p = httptools.HttpResponseParser(self)
        self._events: list[H1Response | bytes | None] = []
        self._head = _Head()
        self._headers: list[tuple[bytes, bytes]] = []
        self._method = "GET"
        self._until_eof = False
        self._complete = True
        self._switching = False
        self.reusable = True  # the connection can carry another request
        self.upgraded_tail = b""  # after a 101: the first bytes of the new protocol

    def start(self, method: str, *, upgrade: bool = False) -> None:
        """Before each request; ``upgrade``: the request asks to switch protocols."""
        self._method = method
        self._complete = False
        self._switching = upgrade

    def on_message_begin(self) -> None:
        self._head = _Head()
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head.add(len(name) + len(value) + 4, self._max_head)
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._p.get_status_code()
        if status == 101:
            self._events.append(H1Response(status, self._headers))
            return  # llhttp raises HttpParserUpgrade next: see feed()
        if 100 <= status < 200:
            return  # 100 Continue and friends: the real answer follows
        self._events.append(H1Response(status, self._headers))
        framed = any(n in (b"content-length", b"transfer-encoding") for n, _ in self._headers)
        if self._method == "HEAD" or status in _NO_BODY:
            # llhttp would wait for a HEAD answer's Content-Length worth of
            # body: stop here and never reuse the connection.
            self._finish()
            self.reusable = False
            raise _Stop
        if not framed:
            self._until_eof = True
            self.reusable = False
        if not self._p.should_keep_alive():
            self.reusable = False

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    def on_message_complete(self) -> None:
        if self._p.get_status_code() < 200:
            return
        self._finish()

    def _finish(self) -> None:
        if not self._complete:
            self._complete = True
            self._events.append(None)

    def feed(self, data: bytes) -> list[H1Response | bytes | None]:
        """Events ``data`` completed; raises ValueError for a malformed response."""
        if self._complete and data:
            if self._until_eof or not self.reusable:
                return []
            raise ValueError("the upstream sent bytes no request asked for")
        try:
            self._p.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Stop):
                raise ValueError(f"malformed upstream response: {e.__context__ or e}") from None
        except httptools.HttpParserUpgrade as e:
            if not self._switching or not any(
                isinstance(ev, H1Response) and ev.status == 101 for ev in self._events
            ):
                raise ValueError("the upstream switched protocols unasked") from None
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            self.upgraded_tail = bytes(data[offset:])
            self._complete = True
            self.reusable = False
        except httptools.HttpParserError as e:
            raise ValueError(f"malformed upstream response: {e}") from None
        events, self._events = self._events, []
        return events

    def feed_eof(self) -> list[H1Response | bytes | None]:
        """The upstream closed: ends a close-delimited body, else raises ValueError."""
        self.reusable = False
        if self._complete:
            return []
        if self._until_eof:
            self._finish()
            events, self._events = self._events, []
            return events
        raise ValueError("the upstream closed the connection mid-response")


class _Stop(Exception):
    """Raised from a callback to stop llhttp after a body-less response head."""
