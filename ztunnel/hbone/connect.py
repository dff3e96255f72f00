"""HBONE CONNECT semantics: what a request must say and what it means (pure).

Istio's ztunnel defines the wire contract this module implements:

* the request is a classic HTTP/2 CONNECT: ``:method CONNECT`` and
  ``:authority`` = ``<pod IP>:<port>`` (IPv6 in brackets), nothing else required;
* the authority IP must equal the L3 destination IP of the HBONE connection
  (the pod address the client dialled), else **400**: a client may not use one
  workload's certificate to reach another pod through it;
* ``forwarded: for="<ip>:<port>"`` (RFC 7239; IPv6 as ``"[ip]:port"``) carries
  the original client address; ``traceparent`` and ``baggage`` are passed on.

:func:`decide_request` turns a validated header list into a
:class:`ConnectRequest` or a :class:`Rejection`; :func:`request_headers` builds
what the client sends. Policy (401) and reachability (503) are decided by the
caller, who gets the :class:`ConnectRequest`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from controller.api.spiffe import SpiffeId

__all__ = [
    "STATUS_BAD_REQUEST",
    "STATUS_DENIED",
    "STATUS_UNAVAILABLE",
    "BadAuthority",
    "ConnectRequest",
    "Rejection",
    "decide_request",
    "format_authority",
    "format_forwarded",
    "normalize_ip",
    "parse_authority",
    "parse_forwarded",
    "request_headers",
]

STATUS_BAD_REQUEST = 400
STATUS_DENIED = 401
STATUS_UNAVAILABLE = 503
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class BadAuthority(ValueError):
    """An authority or forwarded value that is not ``ip:port``."""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """One accepted-for-evaluation CONNECT: who asks, for which pod address."""

    stream_id: int
    peer_identity: SpiffeId  # verified SPIFFE ID of the HBONE client
    host: str  # the destination pod IP, normalized
    port: int
    l3_dst: str  # the address the HBONE connection was made to
    peer_addr: tuple[str, int]  # the HBONE connection's source address
    forwarded_for: tuple[str, int | None] | None = None  # original client (ip, port)
    traceparent: str | None = None
    baggage: str | None = None

    @property
    def authority(self) -> str:
        return format_authority(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    reason: str


# normalize_ip results: every CONNECT parses its authority and forwarded
# addresses, from a small set of pods; ipaddress parsing was ~7% of the
# server's CPU per connection in profiles. Only valid input is kept, bounded.
_NORMALIZED_MAX = 4096
_normalized: dict[str, str] = {}


def normalize_ip(value: str) -> str:
    """Canonical text of an IP; IPv4-mapped IPv6 (dual-stack sockets) becomes IPv4."""
    hit = _normalized.get(value)
    if hit is not None:
        return hit
    canonical = _normalize_ip(value)
    if len(_normalized) >= _NORMALIZED_MAX:
        _normalized.clear()
    _normalized[value] = canonical
    return canonical


def _normalize_ip(value: str) -> str:
    if "%" in value:
        raise BadAuthority(f"scoped address {value!r} is not allowed")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise BadAuthority(f"{value!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _split_host_port(value: str, *, port_required: bool) -> tuple[str, int | None]:
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or ":" not in host:
            raise BadAuthority(f"{value!r}: bracketed host must be an IPv6 address")
        if not rest:
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise BadAuthority(f"{value!r}: unexpected text after ']'")
    else:
        if value.count(":") > 1:
            raise BadAuthority(f"{value!r}: an IPv6 address must be in brackets")
        host, sep, port_part = value.partition(":")
        port_text = port_part if sep else None
    if port_text is None:
        if port_required:
            raise BadAuthority(f"{value!r} has no port")
        return normalize_ip(host), None
    if not _PORT_RE.match(port_text) or not 0 < int(port_text) < 65536:
        raise BadAuthority(f"{value!r}: port must be 1-65535")
    return normalize_ip(host), int(port_text)


def parse_authority(value: str) -> tuple[str, int]:
    """``"10.0.0.5:8080"`` or ``"[fd00::5]:8080"`` -> ``(ip, port)``; hostnames are refused."""
    host, port = _split_host_port(value, port_required=True)
    assert port is not None
    return host, port


def format_authority(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def format_forwarded(ip: str, port: int) -> str:
    """The ``forwarded`` header value for the original client address."""
    return f'for="{format_authority(ip, port)}"'


def parse_forwarded(value: str) -> tuple[str, int | None] | None:
    """The ``for=`` node of the first (originating) element of a Forwarded header.

    ``None`` for ``unknown`` or obfuscated (``_name``) nodes; BadAuthority for
    anything malformed.
    """
    first = value.split(",", 1)[0]
    for pair in first.split(";"):
        key, sep, val = pair.strip().partition("=")
        if not sep:
            raise BadAuthority(f"forwarded element {pair.strip()[:60]!r} is not key=value")
        if key.strip().lower() != "for":
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        elif not _TOKEN_RE.match(val):
            raise BadAuthority(f"forwarded for={val[:60]!r} must be a token or a quoted string")
        if val.lower() == "unknown" or val.startswith("_"):
            return None
        return _split_host_port(val, port_required=False)
    return None


def request_headers(
    target_ip: str,
    target_port: int,
    forwarded_for: tuple[str, int] | None,
    *,
    traceparent: str | None = None,
    baggage: str | None = None,
) -> list[tuple[str, str]]:
    """The header list of an HBONE CONNECT from the client side."""
    headers = [(":method", "CONNECT"), (":authority", format_authority(target_ip, target_port))]
    if forwarded_for is not None:
        headers.append(("forwarded", format_forwarded(*forwarded_for)))
    if traceparent:
        headers.append(("traceparent", traceparent))
    if baggage:
        headers.append(("baggage", baggage))
    return headers


def decide_request(
    headers: Sequence[tuple[str, str]],
    *,
    stream_id: int,
    peer_identity: SpiffeId,
    l3_dst: str,
    peer_addr: tuple[str, int],
    require_authority_is_destination: bool = True,
) -> ConnectRequest | Rejection:
    """Check a (structurally valid) request against the HBONE rules.

    ``require_authority_is_destination`` (the ztunnel's rule, and the default)
    refuses an authority IP other than ``l3_dst``, the address the client
    dialled. A waypoint turns it off: it is dialled at its own address and the
    authority names the destination it is asked to reach.
    """
    fields: dict[str, str] = {}
    for name, value in headers:
        if name in fields and name in ("forwarded", "traceparent", "baggage"):
            fields[name] = f"{fields[name]},{value}"
        else:
            fields.setdefault(name, value)
    if fields.get(":method") != "CONNECT" or ":protocol" in fields:
        return Rejection(STATUS_BAD_REQUEST, "only CONNECT is served on the HBONE port")
    try:
        host, port = parse_authority(fields.get(":authority", ""))
    except BadAuthority as exc:
        return Rejection(STATUS_BAD_REQUEST, f"bad :authority: {exc}")
    try:
        dst = normalize_ip(l3_dst)
    except BadAuthority:
        return Rejection(STATUS_BAD_REQUEST, f"connection destination {l3_dst!r} is not an IP")
    if require_authority_is_destination and host != dst:
        return Rejection(
            STATUS_BAD_REQUEST,
            f"authority IP {host} differs from the connection's destination {dst}",
        )
    forwarded: tuple[str, int | None] | None = None
    if "forwarded" in fields:
        try:
            forwarded = parse_forwarded(fields["forwarded"])
        except BadAuthority as exc:
            return Rejection(STATUS_BAD_REQUEST, f"bad forwarded header: {exc}")
    return ConnectRequest(
        stream_id=stream_id,
        peer_identity=peer_identity,
        host=host,
        port=port,
        l3_dst=dst,
        peer_addr=peer_addr,
        forwarded_for=forwarded,
        traceparent=fields.get("traceparent"),
        baggage=fields.get("baggage"),
    )
