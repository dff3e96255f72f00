"""Table-driven tests of the pure HBONE pieces: frames, stream table, headers, CONNECT rules."""

from __future__ import annotations

import pytest

from controller.api.spiffe import SpiffeId
from ztunnel.hbone.connect import (
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
from ztunnel.hbone.http2 import frames as fr
from ztunnel.hbone.http2.headers import MalformedHeaders, validate_request, validate_response
from ztunnel.hbone.http2.streams import TRANSITIONS, Input, State, StreamStateError, transition

PEER = SpiffeId("cluster.local", "/ns/a/sa/b")


def test_frame_header_roundtrip() -> None:
    for length, ftype, flags, sid in [
        (0, 0, 0, 0),
        (16_777_215, 9, 255, 2**31 - 1),
        (1 << 20, 0, 1, 7),
    ]:
        assert fr.unpack_header(fr.pack_header(length, ftype, flags, sid)) == (
            length,
            ftype,
            flags,
            sid,
        )
    # The reserved bit is ignored on receipt.
    raw = bytearray(fr.pack_header(4, 8, 0, 5))
    raw[5] |= 0x80
    assert fr.unpack_header(bytes(raw)) == (4, 8, 0, 5)


def test_headers_are_split_into_continuations() -> None:
    data = fr.headers_frames(1, b"a" * 40000, True, 16384)
    heads = []
    pos = 0
    while pos < len(data):
        length, ftype, flags, _sid = fr.unpack_header(data, pos)
        heads.append((length, ftype, flags))
        pos += 9 + length
    assert heads == [
        (16384, fr.FrameType.HEADERS, fr.Flag.END_STREAM),
        (16384, fr.FrameType.CONTINUATION, 0),
        (40000 - 32768, fr.FrameType.CONTINUATION, fr.Flag.END_HEADERS),
    ]


@pytest.mark.parametrize(
    ("state", "inp", "expected"),
    [
        (State.IDLE, Input.SEND_HEADERS, State.OPEN),
        (State.IDLE, Input.RECV_HEADERS_END, State.HALF_CLOSED_REMOTE),
        (State.OPEN, Input.SEND_END_STREAM, State.HALF_CLOSED_LOCAL),
        (State.OPEN, Input.RECV_END_STREAM, State.HALF_CLOSED_REMOTE),
        (State.HALF_CLOSED_LOCAL, Input.RECV_END_STREAM, State.CLOSED),
        (State.HALF_CLOSED_REMOTE, Input.SEND_END_STREAM, State.CLOSED),
        (State.HALF_CLOSED_REMOTE, Input.SEND_HEADERS_END, State.CLOSED),
        (State.OPEN, Input.RECV_RST, State.CLOSED),
        (State.HALF_CLOSED_LOCAL, Input.SEND_RST, State.CLOSED),
    ],
)
def test_stream_transitions(state: State, inp: Input, expected: State) -> None:
    assert transition(state, inp) is expected


@pytest.mark.parametrize(
    ("state", "inp"),
    [
        (State.IDLE, Input.SEND_DATA),
        (State.IDLE, Input.RECV_RST),
        (State.HALF_CLOSED_LOCAL, Input.SEND_DATA),
        (State.HALF_CLOSED_REMOTE, Input.RECV_DATA),
        (State.HALF_CLOSED_REMOTE, Input.RECV_HEADERS),
        (State.CLOSED, Input.RECV_DATA),
        (State.CLOSED, Input.SEND_RST),
    ],
)
def test_transitions_outside_the_table_raise(state: State, inp: Input) -> None:
    with pytest.raises(StreamStateError):
        transition(state, inp)


def test_closed_is_terminal() -> None:
    assert not [k for k in TRANSITIONS if k[0] is State.CLOSED]


CONNECT_OK = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")]


@pytest.mark.parametrize(
    "raw",
    [
        [(b":authority", b"10.0.0.1:80")],  # no :method
        [(b":method", b"CONNECT")],  # no :authority
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
        [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a:1")],
        [(b":method", b"GET"), (b":authority", b"a")],  # GET without :scheme/:path
        [(b":method", b"CONNECT"), (b":method", b"CONNECT"), (b":authority", b"a:1")],
        [(b":method", b"CONNECT"), (b"x", b"1"), (b":authority", b"a:1")],  # pseudo after regular
        [*CONNECT_OK, (b"Upper", b"x")],
        [*CONNECT_OK, (b"connection", b"close")],
        [*CONNECT_OK, (b"te", b"gzip")],
        [*CONNECT_OK, (b"x", b"a\r\nb")],
        [*CONNECT_OK, (b"x", b" padded")],
        [*CONNECT_OK, (b":status", b"200")],
        [*CONNECT_OK, (b"", b"x")],
    ],
)
def test_malformed_requests(raw: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedHeaders):
        validate_request(raw)


def test_valid_request_and_response() -> None:
    assert validate_request([*CONNECT_OK, (b"te", b"trailers")])[0] == (":method", "CONNECT")
    assert validate_response([(b":status", b"200"), (b"server", b"x")])[0] == 200
    for bad in (
        [],
        [(b":status", b"20")],
        [(b":status", b"\xb2\xb2\xb2")],
        [(b":status", b"200"), (b":path", b"/")],
    ):
        with pytest.raises(MalformedHeaders):
            validate_response(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("[fd00::1]:443", ("fd00::1", 443)),
        ("[::ffff:10.0.0.1]:8080", ("10.0.0.1", 8080)),
        ("[FD00:0:0::1]:1", ("fd00::1", 1)),
    ],
)
def test_parse_authority(text: str, expected: tuple[str, int]) -> None:
    assert parse_authority(text) == expected
    assert parse_authority(format_authority(*expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10.0.0.1",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:+80",
        "fd00::1:80",
        "[fd00::1]",
        "[10.0.0.1]:80",
        "example.com:80",
        "010.0.0.1:80",
        "[fe80::1%eth0]:80",
        "10.0.0.1:80x",
        "[fd00::1]x:1",
    ],
)
def test_parse_authority_refuses(text: str) -> None:
    with pytest.raises(BadAuthority):
        parse_authority(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('for="10.1.2.3:4567"', ("10.1.2.3", 4567)),
        ('for="[2001:db8::1]:4711"', ("2001:db8::1", 4711)),
        ("for=10.1.2.3", ("10.1.2.3", None)),
        ('For="10.1.2.3:1";proto=https, for=10.9.9.9', ("10.1.2.3", 1)),
        ("for=unknown", None),
        ("for=_hidden", None),
        ("proto=https", None),
    ],
)
def test_parse_forwarded(value: str, expected: tuple[str, int | None] | None) -> None:
    assert parse_forwarded(value) == expected


@pytest.mark.parametrize(
    "value", ["for", 'for="10.1.2.3:x"', "for=[::1]:1", 'for="host.example:80"']
)
def test_parse_forwarded_refuses(value: str) -> None:
    with pytest.raises(BadAuthority):
        parse_forwarded(value)


def test_forwarded_roundtrip() -> None:
    assert format_forwarded("fd00::2", 9) == 'for="[fd00::2]:9"'
    assert parse_forwarded(format_forwarded("fd00::2", 9)) == ("fd00::2", 9)


def _decide(headers: list[tuple[str, str]], l3: str = "10.0.0.1") -> ConnectRequest | Rejection:
    return decide_request(
        headers, stream_id=1, peer_identity=PEER, l3_dst=l3, peer_addr=("10.9.0.1", 5555)
    )


@pytest.mark.parametrize(
    ("headers", "l3", "status"),
    [
        ([(":method", "CONNECT"), (":authority", "10.0.0.2:80")], "10.0.0.1", 400),  # other pod
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80")], "::ffff:10.0.0.2", 400),
        (
            [
                (":method", "GET"),
                (":authority", "10.0.0.1:80"),
                (":scheme", "https"),
                (":path", "/"),
            ],
            "10.0.0.1",
            400,
        ),
        ([(":method", "CONNECT"), (":authority", "pod.example:80")], "10.0.0.1", 400),
        (
            [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("forwarded", "for")],
            "10.0.0.1",
            400,
        ),
    ],
)
def test_decide_request_rejections(headers: list[tuple[str, str]], l3: str, status: int) -> None:
    decision = _decide(headers, l3)
    assert isinstance(decision, Rejection) and decision.status == status


def test_decide_request_accepts_the_client_headers() -> None:
    headers = request_headers(
        "fd00::7", 8080, ("fd00::9", 40000), traceparent="00-abc-def-01", baggage="k=v"
    )
    decision = _decide(headers, l3="fd00::7")
    assert decision == ConnectRequest(
        stream_id=1,
        peer_identity=PEER,
        host="fd00::7",
        port=8080,
        l3_dst="fd00::7",
        peer_addr=("10.9.0.1", 5555),
        forwarded_for=("fd00::9", 40000),
        traceparent="00-abc-def-01",
        baggage="k=v",
    )
    assert isinstance(decision, ConnectRequest) and decision.authority == "[fd00::7]:8080"
    # IPv4-mapped destinations (dual-stack listeners) compare as IPv4.
    assert isinstance(
        _decide([(":method", "CONNECT"), (":authority", "10.0.0.1:80")], "::ffff:10.0.0.1"),
        ConnectRequest,
    )


def test_a_waypoint_accepts_any_destination_authority_but_not_a_bad_one() -> None:
    other = [(":method", "CONNECT"), (":authority", "10.96.0.5:80")]
    assert isinstance(_decide(other), Rejection)  # the ztunnel's rule is the default
    decision = decide_request(
        other,
        stream_id=1,
        peer_identity=PEER,
        l3_dst="10.0.0.1",
        peer_addr=("10.9.0.1", 5555),
        require_authority_is_destination=False,
    )
    assert isinstance(decision, ConnectRequest)
    assert (decision.host, decision.port, decision.l3_dst) == ("10.96.0.5", 80, "10.0.0.1")
    bad = decide_request(
        [(":method", "CONNECT"), (":authority", "svc.example:80")],
        stream_id=1,
        peer_identity=PEER,
        l3_dst="10.0.0.1",
        peer_addr=("10.9.0.1", 5555),
        require_authority_is_destination=False,
    )
    assert isinstance(bad, Rejection) and bad.status == 400


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_stream_window": 1 << 31},
        {"connection_window": 100},
        {"max_frame_size": 1000},
        {"max_concurrent_streams": 0},
    ],
)
def test_invalid_h2_settings_are_refused(kwargs: dict[str, int]) -> None:
    from ztunnel.errors import ConfigError
    from ztunnel.hbone.http2.settings import H2Settings

    with pytest.raises(ConfigError, match="invalid HTTP/2 settings"):
        H2Settings(**kwargs)  # type: ignore[arg-type]
