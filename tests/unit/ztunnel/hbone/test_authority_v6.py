"""HBONE CONNECT with IPv6 destinations and clients (issue 9 §2), without sockets.

The authority of a v6 destination is ``[addr]:port`` (RFC 3986 §3.2.2); the
server parses it, requires it to be the connection's L3 destination (compared
in canonical form) and reads ``forwarded: for="[v6]:port"`` (RFC 7239 §6).
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api.spiffe import workload_identity
from ztunnel.hbone.connect import (
    STATUS_BAD_REQUEST,
    BadAuthority,
    ConnectRequest,
    Rejection,
    decide_request,
    format_authority,
    format_forwarded,
    parse_authority,
    parse_forwarded,
    request_headers,
)

CHECKOUT = workload_identity("cluster.local", "shop", "checkout")
PAYMENTS6 = "fd00:244:2::a"
CHECKOUT6 = "fd00:244:1::a"


def decide(authority: str, l3_dst: str, *extra: tuple[str, str]) -> ConnectRequest | Rejection:
    headers = [(":method", "CONNECT"), (":authority", authority), *extra]
    return decide_request(
        headers, stream_id=1, peer_identity=CHECKOUT, l3_dst=l3_dst, peer_addr=("fd00:100::b", 1)
    )


def test_client_builds_bracketed_authority_and_forwarded() -> None:
    headers = dict(request_headers(PAYMENTS6, 8081, (CHECKOUT6, 40000)))
    assert headers[":authority"] == "[fd00:244:2::a]:8081"
    assert headers["forwarded"] == 'for="[fd00:244:1::a]:40000"'
    assert format_authority("10.244.2.10", 8081) == "10.244.2.10:8081"
    assert format_forwarded("10.244.1.10", 1) == 'for="10.244.1.10:1"'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[fd00:244:2::a]:8081", (PAYMENTS6, 8081)),
        ("[FD00:244:2:0:0:0:0:A]:8081", (PAYMENTS6, 8081)),  # canonical form out
        ("[::ffff:10.244.2.10]:80", ("10.244.2.10", 80)),  # mapped v4 is v4
        ("[::1]:1", ("::1", 1)),
        ("10.244.2.10:65535", ("10.244.2.10", 65535)),
    ],
)
def test_parse_authority_v6(text: str, expected: tuple[str, int]) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "fd00:244:2::a:8081",  # v6 without brackets: the port is ambiguous
        "[fd00:244:2::a]",  # no port
        "[fd00:244:2::a]:",  # empty port
        "[fd00:244:2::a]:0",
        "[fd00:244:2::a]:65536",
        "[fd00:244:2::a]8081",
        "[fd00:244:2::a:8081",
        "[10.244.2.10]:80",  # brackets are for IPv6 only
        "[fe80::1%eth0]:80",  # a zone names an interface of the client, not a pod
        "[fd00::g]:80",
        "[payments.shop]:80",
        "payments.shop:80",
    ],
)
def test_parse_authority_v6_refuses(text: str) -> None:
    with pytest.raises(BadAuthority):
        parse_authority(text)


@given(st.ip_addresses(v=6), st.integers(1, 65535))
def test_format_then_parse_round_trips(addr: ipaddress.IPv6Address, port: int) -> None:
    host, parsed_port = parse_authority(format_authority(str(addr), port))
    expected = addr.ipv4_mapped if addr.ipv4_mapped is not None else addr
    assert (ipaddress.ip_address(host), parsed_port) == (expected, port)


def test_server_accepts_v6_authority_equal_to_the_l3_destination() -> None:
    req = decide(f"[{PAYMENTS6}]:8081", "FD00:244:2::A", ("forwarded", f'for="[{CHECKOUT6}]:7"'))
    assert isinstance(req, ConnectRequest), req
    assert (req.host, req.port, req.l3_dst) == (PAYMENTS6, 8081, PAYMENTS6)
    assert req.forwarded_for == (CHECKOUT6, 7)
    assert req.authority == "[fd00:244:2::a]:8081"


@pytest.mark.parametrize(
    ("authority", "l3_dst"),
    [
        ("[fd00:244:2::c]:8081", PAYMENTS6),  # another pod behind the same node
        (f"[{PAYMENTS6}]:8081", "10.244.2.10"),  # same pod, other family: not the L3 address
        ("10.244.2.10:8081", PAYMENTS6),
        (f"[{PAYMENTS6}]:8081", "fd00:244:2::a%eth0"),  # not an address the server can own
    ],
)
def test_server_refuses_v6_authority_that_is_not_the_l3_destination(
    authority: str, l3_dst: str
) -> None:
    rej = decide(authority, l3_dst)
    assert isinstance(rej, Rejection), rej
    assert rej.status == STATUS_BAD_REQUEST


def test_server_accepts_mapped_l3_destination_for_a_v4_authority() -> None:
    # A dual-stack HBONE listener reports its IPv4 local address as mapped.
    req = decide("10.244.2.10:8081", "::ffff:10.244.2.10")
    assert isinstance(req, ConnectRequest) and req.host == "10.244.2.10"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('for="[fd00:244:1::a]:40000"', (CHECKOUT6, 40000)),
        ('for="[FD00:244:1::A]"', (CHECKOUT6, None)),
        ('for="[fd00:244:1::a]:40000", for=10.0.0.1', (CHECKOUT6, 40000)),
        ('proto=https;for="[fd00:244:1::a]:1"', (CHECKOUT6, 1)),
        ("for=unknown", None),
    ],
)
def test_parse_forwarded_v6(value: str, expected: tuple[str, int | None] | None) -> None:
    assert parse_forwarded(value) == expected


@pytest.mark.parametrize(
    "value",
    ["for=[fd00:244:1::a]:1", 'for="fd00:244:1::a"', 'for="[fd00:244:1::a]:99999"'],
)
def test_parse_forwarded_v6_refuses(value: str) -> None:
    with pytest.raises(BadAuthority):
        parse_forwarded(value)
