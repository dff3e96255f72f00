"""Hypothesis fuzzing of the sans-IO HTTP/2 connection with hostile peer input.

Whatever a peer sends, the connection must only ever produce events (never an
exception), end with GOAWAY when it gives up, stay silent afterwards, and keep
its bookkeeping within the limits it advertised.
"""

from __future__ import annotations

import hpack
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel.hbone.http2 import frames as fr
from ztunnel.hbone.http2.connection import H2Connection, Role
from ztunnel.hbone.http2.events import ConnectionTerminated, DataReceived, Event, RequestReceived
from ztunnel.hbone.http2.settings import H2Settings

T = fr.FrameType
F = fr.Flag
LIMITS = H2Settings(max_concurrent_streams=8)

stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 9, 11, 0x7FFFFFFF])
flags = st.integers(0, 255)
header_names = st.sampled_from(
    [
        ":method",
        ":authority",
        ":path",
        ":scheme",
        ":status",
        ":protocol",
        "forwarded",
        "te",
        "connection",
        "x-a",
        "Upper",
        "",
        "baggage",
    ]
)
header_values = st.sampled_from(
    ["CONNECT", "GET", "10.0.0.1:80", "[::1]:1", "trailers", "a\r\nb", "", "x" * 300]
)
headers = st.lists(st.tuples(header_names, header_values), max_size=8)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 14))
    sid = draw(stream_ids)
    fl = draw(flags)
    if kind == T.HEADERS or kind == T.CONTINUATION:
        block = hpack.Encoder().encode(draw(headers))
        if draw(st.booleans()):
            block = draw(st.binary(max_size=64))
        return fr.pack_header(len(block), kind, fl, sid) + block
    if kind == T.SETTINGS:
        pairs = draw(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**32 - 1)), max_size=4))
        body = fr.settings_frame(pairs)[9:]
        return fr.pack_header(len(body), T.SETTINGS, fl, sid) + body
    if kind == T.WINDOW_UPDATE:
        return fr.pack_header(4, T.WINDOW_UPDATE, fl, sid) + draw(
            st.integers(0, 2**32 - 1)
        ).to_bytes(4, "big")
    length = draw(st.integers(0, 64))
    payload = draw(st.binary(min_size=length, max_size=length))
    if kind == T.DATA and draw(st.booleans()):
        payload = b"\x00" * draw(st.integers(0, 70000))
    return fr.pack_header(len(payload), kind, fl, sid) + payload


@st.composite
def sessions(draw: st.DrawFn) -> list[bytes]:
    """Mostly well-formed client sessions (so streams really open) with hostile turns."""
    enc = hpack.Encoder()
    out = [fr.PREFACE + fr.settings_frame([])]
    next_sid, opened = 1, [1]
    for _ in range(draw(st.integers(1, 30))):
        op = draw(
            st.sampled_from(
                ["open", "open", "data", "data", "rst", "wu", "ping", "end", "split", "noise"]
            )
        )
        sid = draw(st.sampled_from(opened))
        if op == "open":
            authority = draw(st.sampled_from(["10.0.0.1:80", "[fd00::1]:443", "bad", "10.0.0.1:0"]))
            block = enc.encode([(":method", "CONNECT"), (":authority", authority)])
            end = F.END_STREAM if draw(st.integers(0, 9)) == 0 else 0
            out.append(fr.pack_header(len(block), T.HEADERS, F.END_HEADERS | end, next_sid) + block)
            opened.append(next_sid)
            next_sid += 2
        elif op == "split":
            block = enc.encode(
                [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x", "y" * 50)]
            )
            parts = [block[i : i + 16] for i in range(0, len(block), 16)]
            out.append(fr.pack_header(len(parts[0]), T.HEADERS, 0, next_sid) + parts[0])
            for i, part in enumerate(parts[1:], 1):
                last = F.END_HEADERS if i == len(parts) - 1 else 0
                out.append(fr.pack_header(len(part), T.CONTINUATION, last, next_sid) + part)
            opened.append(next_sid)
            next_sid += 2
        elif op == "data":
            size = draw(st.sampled_from([0, 1, 1000, 70000, 1 << 20]))
            pad = draw(st.sampled_from([None, 0, 10]))
            end = F.END_STREAM if draw(st.booleans()) else 0
            if pad is None:
                out.append(fr.pack_header(size, T.DATA, end, sid) + b"d" * size)
            else:
                body = bytes([pad]) + b"d" * min(size, 1000) + b"\0" * pad
                out.append(fr.pack_header(len(body), T.DATA, end | F.PADDED, sid) + body)
        elif op == "rst":
            out.append(fr.rst_stream_frame(sid, draw(st.integers(0, 13))))
        elif op == "wu":
            out.append(
                fr.window_update_frame(
                    draw(st.sampled_from([0, sid])), draw(st.integers(0, 2**31 - 1))
                )
            )
        elif op == "ping":
            out.append(fr.ping_frame(b"12345678", ack=draw(st.booleans())))
        elif op == "end":
            out.append(fr.pack_header(0, T.DATA, F.END_STREAM, sid))
        else:
            out.append(draw(frames()))
    return out


def check(conn: H2Connection, chunks: list[bytes]) -> None:
    terminated = False
    for chunk in chunks:
        events: list[Event] = conn.receive_data(chunk)
        if terminated:
            assert events == []
            continue
        for i, event in enumerate(events):
            if isinstance(event, ConnectionTerminated) and (event.fatal or not event.remote):
                assert i == len(events) - 1
                terminated = True
            if isinstance(event, DataReceived):
                # The driver delivers and acknowledges, as the relay does.
                conn.acknowledge_received_data(event.stream_id, len(event.data))
        assert conn.open_streams <= LIMITS.max_concurrent_streams
        out = b"".join(bytes(x) for x in conn.data_to_send())
        if terminated and not conn.closed:
            continue
        if conn.closed and conn.error is not None:
            assert fr.FrameType.GOAWAY in _types(out) or out == b""


def _types(data: bytes) -> set[int]:
    types, pos = set(), 0
    while pos + 9 <= len(data):
        length, ftype, _, _ = fr.unpack_header(data, pos)
        types.add(ftype)
        pos += 9 + length
    return types


def _server() -> H2Connection:
    s = H2Connection(Role.SERVER, LIMITS)
    s.initiate()
    s.data_to_send()
    return s


@settings(max_examples=300)
@given(st.lists(frames(), max_size=25), st.integers(1, 200))
def test_server_survives_arbitrary_frames(frame_list: list[bytes], split: int) -> None:
    wire = fr.PREFACE + fr.settings_frame([]) + b"".join(frame_list)
    chunks = [wire[i : i + split] for i in range(0, len(wire), split)]
    check(_server(), chunks)


@settings(max_examples=300)
@given(sessions(), st.integers(1, 5000))
def test_server_survives_hostile_sessions(chunks: list[bytes], split: int) -> None:
    s = _server()
    wire = b"".join(chunks)
    check(s, [wire[i : i + split] for i in range(0, len(wire), split)])


@settings(max_examples=200)
@given(st.binary(max_size=512))
def test_server_survives_random_bytes_after_the_preface(noise: bytes) -> None:
    check(_server(), [fr.PREFACE + fr.settings_frame([]), noise])


@settings(max_examples=100)
@given(st.binary(max_size=128))
def test_server_survives_a_random_preface(noise: bytes) -> None:
    check(_server(), [noise])


@settings(max_examples=200)
@given(st.lists(frames(), max_size=25))
def test_client_survives_arbitrary_frames(frame_list: list[bytes]) -> None:
    c = H2Connection(Role.CLIENT, LIMITS)
    c.initiate()
    c.data_to_send()
    c.receive_data(fr.settings_frame([]))
    for _ in range(3):
        c.send_request([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    c.data_to_send()
    check(c, frame_list)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=60))
def test_request_reset_churn_never_exceeds_stream_limit(ops: list[tuple[bool, int]]) -> None:
    """Opening and resetting streams in any order keeps the counts consistent."""
    s = _server()
    enc = hpack.Encoder()
    s.receive_data(fr.PREFACE + fr.settings_frame([]))
    sid = 1
    live: list[int] = []
    for opens, pick in ops:
        if opens or not live:
            block = enc.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
            events = s.receive_data(
                fr.pack_header(len(block), T.HEADERS, F.END_HEADERS, sid) + block
            )
            if any(isinstance(e, RequestReceived) for e in events):
                live.append(sid)
            sid += 2
        else:
            victim = live.pop(pick % len(live))
            s.receive_data(fr.rst_stream_frame(victim, fr.ErrorCode.CANCEL))
        assert s.open_streams == len(live) <= LIMITS.max_concurrent_streams
        s.data_to_send()
