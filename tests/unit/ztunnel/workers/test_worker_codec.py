"""The supervisor <-> worker frames: round trips, and garbage is one error type."""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.api.model import (
    Namespace,
    ResourceType,
    TrustBundle,
    WatchUpdate,
)
from controller.api.spiffe import workload_identity
from ztunnel.config import ZtunnelConfig
from ztunnel.identity import WorkloadCertificate
from ztunnel.workers.codec import (
    MAX_FRAME,
    VERSION,
    Frame,
    FrameDecoder,
    Hello,
    IpcError,
    Kind,
    decode_certificate,
    decode_hello,
    decode_state,
    encode,
    encode_certificate,
    encode_hello,
    encode_json,
    encode_state,
    parse_json,
)

IDENT = workload_identity("cluster.local", "shop", "checkout")


def one(data: bytes) -> Frame:
    frames = FrameDecoder().feed(data)
    assert len(frames) == 1
    return frames[0]


def test_frames_split_anywhere_decode_the_same() -> None:
    wire = encode_json(Kind.QUERY, {"id": 1, "what": "metrics"}) + encode(Kind.STATE, b"x" * 70_000)
    for cut in (1, 3, 6, 7, 50, 70_000, len(wire) - 1):
        dec = FrameDecoder()
        frames = dec.feed(wire[:cut]) + dec.feed(wire[cut:])
        assert [f.kind for f in frames] == [Kind.QUERY, Kind.STATE]
        assert parse_json(frames[0]) == {"id": 1, "what": "metrics"}
        assert frames[1].body == b"x" * 70_000
        assert dec.buffered == 0


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (struct.pack("!BBI", VERSION + 1, int(Kind.HELLO), 0), "version"),
        (struct.pack("!BBI", VERSION, 200, 0), "unknown frame kind"),
        (struct.pack("!BBI", VERSION, int(Kind.STATE), MAX_FRAME + 1), "exceeds"),
    ],
)
def test_bad_headers_are_refused_before_buffering(header: bytes, message: str) -> None:
    with pytest.raises(IpcError, match=message):
        FrameDecoder().feed(header)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[1, 2]", b"not json", b""])
def test_a_json_body_must_be_an_object(body: bytes) -> None:
    with pytest.raises(IpcError):
        parse_json(Frame(Kind.QUERY, body))


def test_state_round_trip_and_garbage() -> None:
    update = WatchUpdate(
        epoch="e1",
        version=7,
        snapshot=False,
        upserts=(Namespace("shop"),),
        removals=((ResourceType.WORKLOAD, "shop/old"),),
        trust_bundle=TrustBundle("cluster.local", (b"-----BEGIN CERTIFICATE-----\n",)),
    )
    assert decode_state(one(encode_state(update))) == update
    with pytest.raises(IpcError):
        decode_state(Frame(Kind.STATE, b"\xff\xff\xff\xff\x0f"))


def cert() -> WorkloadCertificate:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return WorkloadCertificate(
        identity=IDENT,
        key_pem=b"-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n",
        chain_pem=(b"leaf", b"intermediate"),
        not_before=now,
        not_after=now + timedelta(hours=1),
        serial=0xABC,
        received_at=now,
    )


def test_certificate_round_trip_keeps_the_key() -> None:
    c = cert()
    back = decode_certificate(one(encode_certificate(c)))
    assert back == c
    assert back.key_pem == c.key_pem


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"identity": "not a spiffe id", "key_pem": "k", "chain_pem": ["c"], '
        b'"not_before": "2026-01-01T00:00:00+00:00", "not_after": "2026-01-01T00:00:00+00:00", '
        b'"serial": 1}',
        b'{"identity": "spiffe://cluster.local/ns/a/sa/b", "key_pem": "k", "chain_pem": [], '
        b'"not_before": "2026-01-01T00:00:00+00:00", "not_after": "x", "serial": 1}',
        b'{"identity": "spiffe://cluster.local/ns/a/sa/b", "key_pem": "k", "chain_pem": ["c"], '
        b'"not_before": "yesterday", "not_after": "x", "serial": true}',
    ],
)
def test_malformed_certificates_are_ipc_errors(body: bytes) -> None:
    with pytest.raises(IpcError):
        decode_certificate(Frame(Kind.CERT, body))


def test_hello_round_trip(tmp_path: Path) -> None:
    hello = Hello(
        index=1,
        config=ZtunnelConfig(
            node_name="node-a",
            state_dir=tmp_path,
            admin_address=("127.0.0.1", 0),
            cert_ttl=60.0,
            workers=2,
        ),
        join_bundle=TrustBundle("cluster.local", (b"root-pem",)),
        transparent=False,
        mark=None,
        peer_hbone_port=15008,
    )
    assert decode_hello(one(encode_hello(hello))) == hello


@pytest.mark.parametrize(
    "body",
    [
        b'{"config": {"node_name": "Not A Node!"}, "index": 0, '
        b'"join_bundle": {"trust_domain": "td", "roots": []}}',
        b'{"config": {"node_name": "n", "surprise": 1}, "index": 0, '
        b'"join_bundle": {"trust_domain": "td", "roots": []}}',
        b'{"config": {"node_name": "n"}, "index": "zero", '
        b'"join_bundle": {"trust_domain": "td", "roots": []}}',
        b'{"config": [], "index": 0}',
    ],
)
def test_malformed_hello_is_an_ipc_error(body: bytes) -> None:
    with pytest.raises(IpcError):
        decode_hello(Frame(Kind.HELLO, body))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_the_decoder_raises_only_ipc_errors(data: bytes) -> None:
    dec = FrameDecoder()
    try:
        for frame in dec.feed(data):
            for decode in (parse_json, decode_certificate, decode_hello, decode_state):
                with contextlib.suppress(IpcError):
                    decode(frame)
    except IpcError:
        pass
