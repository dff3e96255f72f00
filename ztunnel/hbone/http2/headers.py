"""Structural checks of HTTP/2 header lists (RFC 9113 section 8.2 and 8.3).

A header list that fails here is *malformed*: the connection answers with a
stream error (RST_STREAM PROTOCOL_ERROR) and keeps going. Request semantics
(is this a CONNECT we serve?) are decided later by :mod:`ztunnel.hbone.connect`.
"""

from __future__ import annotations

import re

from ..errors import HboneError

__all__ = ["MalformedHeaders", "validate_request", "validate_response"]

_REQUEST_PSEUDO = frozenset({":method", ":scheme", ":authority", ":path", ":protocol"})
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
# Field names: lowercase token characters (RFC 9110 tchar without uppercase).
_NAME_RE = re.compile(rb"^:?[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE_RE = re.compile(rb"[\x00\r\n]")


class MalformedHeaders(HboneError):
    """A header list is not a well-formed HTTP/2 request or response."""


def _decode(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    out = []
    for name, value in raw:
        if not _NAME_RE.match(name):
            raise MalformedHeaders(f"invalid header name {name[:40]!r}")
        if _BAD_VALUE_RE.search(value) or value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
            raise MalformedHeaders(f"invalid value for header {name.decode('ascii')!r}")
        out.append((name.decode("ascii"), value.decode("latin-1")))
    return out


def _split(headers: list[tuple[str, str]], allowed: frozenset[str]) -> dict[str, str]:
    pseudo: dict[str, str] = {}
    regular_seen = False
    for name, value in headers:
        if name.startswith(":"):
            if regular_seen:
                raise MalformedHeaders(f"pseudo-header {name} after a regular header")
            if name not in allowed:
                raise MalformedHeaders(f"pseudo-header {name} is not allowed here")
            if name in pseudo:
                raise MalformedHeaders(f"pseudo-header {name} appears twice")
            pseudo[name] = value
            continue
        regular_seen = True
        if name in _CONNECTION_SPECIFIC:
            raise MalformedHeaders(f"connection-specific header {name} is not allowed in HTTP/2")
        if name == "te" and value != "trailers":
            raise MalformedHeaders("the te header may only be 'trailers'")
    return pseudo


def validate_request(raw: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    """The decoded header list of a well-formed request, or MalformedHeaders."""
    headers = _decode(raw)
    pseudo = _split(headers, _REQUEST_PSEUDO)
    method = pseudo.get(":method")
    if method is None:
        raise MalformedHeaders("request without :method")
    if method == "CONNECT" and ":protocol" not in pseudo:
        if ":scheme" in pseudo or ":path" in pseudo:
            raise MalformedHeaders("CONNECT must not carry :scheme or :path")
        if not pseudo.get(":authority"):
            raise MalformedHeaders("CONNECT without :authority")
    elif ":protocol" in pseudo:
        # Extended CONNECT needs SETTINGS_ENABLE_CONNECT_PROTOCOL, which we never offer.
        raise MalformedHeaders(":protocol is not supported")
    elif not pseudo.get(":scheme") or not pseudo.get(":path"):
        raise MalformedHeaders("request without :scheme or :path")
    return tuple(headers)


def validate_response(raw: list[tuple[bytes, bytes]]) -> tuple[int, tuple[tuple[str, str], ...]]:
    """``(status, headers)`` of a well-formed response, or MalformedHeaders."""
    headers = _decode(raw)
    pseudo = _split(headers, frozenset({":status"}))
    status = pseudo.get(":status", "")
    if len(status) != 3 or not (status.isascii() and status.isdigit()):
        raise MalformedHeaders(f"response with an invalid :status {status[:10]!r}")
    return int(status), tuple(headers)
