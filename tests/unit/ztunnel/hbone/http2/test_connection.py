"""Scripted HTTP/2 exchanges with the sans-IO connection: bytes in, bytes and events out."""

from __future__ import annotations

import hpack
import pytest

from ztunnel.hbone.errors import LocalProtocolError
from ztunnel.hbone.http2 import frames as fr
from ztunnel.hbone.http2.connection import H2Connection, Role
from ztunnel.hbone.http2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAcked,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from ztunnel.hbone.http2.settings import H2Settings
from ztunnel.hbone.http2.streams import State

E = fr.ErrorCode
T = fr.FrameType
F = fr.Flag
CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.7:8080")]
MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def out(conn: H2Connection) -> bytes:
    return b"".join(bytes(x) for x in conn.data_to_send())


def pump(a: H2Connection, b: H2Connection) -> list[Event]:
    return b.receive_data(out(a))


def pair(settings: H2Settings | None = None) -> tuple[H2Connection, H2Connection]:
    c = H2Connection(Role.CLIENT, settings)
    s = H2Connection(Role.SERVER, settings)
    c.initiate()
    s.initiate()
    pump(c, s)
    pump(s, c)
    pump(c, s)  # SETTINGS ACKs
    pump(s, c)
    return c, s


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return fr.pack_header(len(payload), ftype, flags, sid) + payload


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames, pos = [], 0
    if data.startswith(fr.PREFACE):
        pos = len(fr.PREFACE)
    while pos < len(data):
        length, ftype, flags, sid = fr.unpack_header(data, pos)
        frames.append((ftype, flags, sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames


def raw_server(clock: Clock | None = None, settings: H2Settings | None = None) -> H2Connection:
    """A server that has received a valid preface and SETTINGS from a scripted client."""
    s = H2Connection(Role.SERVER, settings, clock=clock or Clock())
    s.initiate()
    s.data_to_send()
    assert s.receive_data(fr.PREFACE + fr.settings_frame([])) == [
        RemoteSettingsChanged(fr.MAX_WINDOW, 65535, 16384)
    ]
    s.data_to_send()
    return s


def request_block(enc: hpack.Encoder, headers: list[tuple[str, str]] = CONNECT) -> bytes:
    return enc.encode(headers)


def goaway_code(data: bytes) -> int | None:
    for ftype, _, _, body in parse_frames(data):
        if ftype == T.GOAWAY:
            return fr.parse_goaway(body)[1]
    return None


def test_preface_settings_and_connection_window() -> None:
    c = H2Connection(Role.CLIENT)
    c.initiate()
    data = out(c)
    assert data.startswith(fr.PREFACE)
    frames = parse_frames(data)
    assert [f[0] for f in frames] == [T.SETTINGS, T.WINDOW_UPDATE]
    settings = dict(fr.parse_settings(frames[0][3]))
    assert settings[fr.SettingCode.ENABLE_PUSH] == 0
    assert settings[fr.SettingCode.INITIAL_WINDOW_SIZE] == 4 * MiB
    assert settings[fr.SettingCode.MAX_FRAME_SIZE] == MiB
    assert fr.parse_u32(frames[1][3]) == 16 * MiB - 65535
    s = H2Connection(Role.SERVER)
    s.initiate()
    assert (
        dict(fr.parse_settings(parse_frames(out(s))[0][3]))[fr.SettingCode.MAX_CONCURRENT_STREAMS]
        == 200
    )


def test_connect_roundtrip_with_half_close() -> None:
    c, s = pair()
    sid = c.send_request(CONNECT)
    assert pump(c, s) == [RequestReceived(sid, tuple(CONNECT), False)]
    with pytest.raises(LocalProtocolError):
        c.send_data(sid, b"too early")  # no DATA before the 200
    s.send_response(sid, 200)
    assert pump(s, c) == [ResponseReceived(sid, 200, ((":status", "200"),), False)]
    assert c.send_data(sid, b"hello") == 5
    events = pump(c, s)
    assert len(events) == 1 and isinstance(events[0], DataReceived)
    assert bytes(events[0].data) == b"hello"
    c.end_stream(sid)
    assert pump(c, s) == [StreamEnded(sid)]
    assert s.stream_state(sid) is State.HALF_CLOSED_REMOTE
    s.send_data(sid, b"bye", end_stream=True)
    events = pump(s, c)
    assert [type(e) for e in events] == [DataReceived, StreamEnded]
    assert c.open_streams == s.open_streams == 0


def test_rejection_status_ends_stream() -> None:
    c, s = pair()
    sid = c.send_request(CONNECT)
    pump(c, s)
    s.send_response(sid, 401, end_stream=True)
    assert pump(s, c) == [ResponseReceived(sid, 401, ((":status", "401"),), True), StreamEnded(sid)]
    with pytest.raises(LocalProtocolError):
        c.send_data(sid, b"x")


def test_data_is_limited_by_windows_and_window_updates_are_batched() -> None:
    c, s = pair()
    sid = c.send_request(CONNECT)
    pump(c, s)
    s.send_response(sid, 200)
    pump(s, c)
    assert c.send_data(sid, b"a" * (5 * MiB)) == 4 * MiB  # the stream window
    assert c.send_window(sid) == 0
    events = pump(c, s)
    got = sum(len(e.data) for e in events if isinstance(e, DataReceived))
    assert got == 4 * MiB
    s.acknowledge_received_data(sid, MiB)
    assert out(s) == b""  # less than half a window: no WINDOW_UPDATE yet
    s.acknowledge_received_data(sid, MiB)
    frames = parse_frames(out(s))
    assert [(f[0], f[2], fr.parse_u32(f[3])) for f in frames] == [(T.WINDOW_UPDATE, sid, 2 * MiB)]
    s.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        s.acknowledge_received_data(sid, 3 * MiB)  # more than was delivered


def test_data_frames_respect_peer_max_frame_size() -> None:
    c = H2Connection(Role.CLIENT)
    c.initiate()
    c.data_to_send()
    # A peer that keeps the default 16 KiB frames but opens big windows.
    server_settings = fr.settings_frame([(fr.SettingCode.INITIAL_WINDOW_SIZE, 1 << 20)])
    c.receive_data(server_settings + fr.window_update_frame(0, 1 << 20))
    sid = c.send_request(CONNECT)
    enc = hpack.Encoder()
    c.receive_data(fr.headers_frames(sid, enc.encode([(":status", "200")]), False, 16384))
    c.data_to_send()
    assert c.send_data(sid, b"z" * 40000) == 40000
    frames = [f for f in parse_frames(out(c)) if f[0] == T.DATA]
    assert [len(f[3]) for f in frames] == [16384, 16384, 40000 - 32768]


def test_flow_control_violation_is_a_connection_error() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    s.receive_data(frame(T.HEADERS, F.END_HEADERS, 1, request_block(enc)))
    s.send_response(1, 200)
    s.data_to_send()
    # Our connection window is 16 MiB and the stream's 4 MiB; 4 MiB + 1 in frames of 1 MiB.
    events: list[Event] = []
    for _ in range(4):
        events += s.receive_data(frame(T.DATA, 0, 1, b"x" * MiB))
    events += s.receive_data(frame(T.DATA, 0, 1, b"x"))
    assert isinstance(events[-1], StreamReset) and events[-1].error_code == E.FLOW_CONTROL_ERROR
    frames = parse_frames(out(s))
    assert (T.RST_STREAM, 1, E.FLOW_CONTROL_ERROR) in [
        (f[0], f[2], fr.parse_u32(f[3])) for f in frames if f[0] == T.RST_STREAM
    ]


def test_oversized_frame_is_frame_size_error() -> None:
    s = raw_server()
    events = s.receive_data(fr.pack_header(MiB + 1, T.DATA, 0, 1))
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.FRAME_SIZE_ERROR
    )
    assert goaway_code(out(s)) == E.FRAME_SIZE_ERROR
    assert s.closed and s.receive_data(b"anything") == []


def test_invalid_preface_is_refused() -> None:
    s = H2Connection(Role.SERVER)
    s.initiate()
    s.data_to_send()
    events = s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.PROTOCOL_ERROR
    )


def test_first_frame_must_be_settings() -> None:
    s = H2Connection(Role.SERVER)
    events = s.receive_data(fr.PREFACE + fr.ping_frame(b"12345678"))
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.PROTOCOL_ERROR
    )


def test_push_promise_is_a_protocol_error() -> None:
    c, _s = pair()
    sid = c.send_request(CONNECT)
    events = c.receive_data(frame(T.PUSH_PROMISE, F.END_HEADERS, sid, b"\x00\x00\x00\x02"))
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.PROTOCOL_ERROR
    )


def test_unknown_frames_and_priority_are_ignored() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    data = frame(0x42, 0xFF, 0, b"whatever") + frame(T.PRIORITY, 0, 3, b"\x00\x00\x00\x01\x10")
    data += frame(
        T.HEADERS, F.END_HEADERS | F.PRIORITY, 1, b"\x00\x00\x00\x00\x10" + request_block(enc)
    )
    events = s.receive_data(data)
    assert events == [RequestReceived(1, tuple(CONNECT), False)]


def test_padded_data_and_headers() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    block = request_block(enc)
    s.receive_data(frame(T.HEADERS, F.END_HEADERS | F.PADDED, 1, bytes([3]) + block + b"\0\0\0"))
    s.send_response(1, 200)
    s.data_to_send()
    events = s.receive_data(
        frame(T.DATA, F.PADDED | F.END_STREAM, 1, bytes([4]) + b"data" + b"\0" * 4)
    )
    assert [type(e) for e in events] == [DataReceived, StreamEnded]
    assert isinstance(events[0], DataReceived) and bytes(events[0].data) == b"data"
    bad = raw_server()
    events = bad.receive_data(frame(T.DATA, F.PADDED, 1, bytes([9]) + b"short"))
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.PROTOCOL_ERROR
    )


def test_continuation_flood_gets_enhance_your_calm() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    block = request_block(enc)
    data = frame(T.HEADERS, 0, 1, block[:1])
    for _ in range(20):
        data += frame(T.CONTINUATION, 0, 1, b"")
    events = s.receive_data(data)
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.ENHANCE_YOUR_CALM
    )
    assert goaway_code(out(s)) == E.ENHANCE_YOUR_CALM


def test_continuation_split_block_is_reassembled() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    block = request_block(enc, [*CONNECT, ("baggage", "k=" + "v" * 300)])
    data = frame(T.HEADERS, 0, 1, block[:10]) + frame(T.CONTINUATION, 0, 1, block[10:20])
    data += frame(T.CONTINUATION, F.END_HEADERS, 1, block[20:])
    events = s.receive_data(data)
    assert isinstance(events[0], RequestReceived) and events[0].headers[-1][0] == "baggage"


def test_interleaved_frame_inside_header_block_is_an_error() -> None:
    s = raw_server()
    block = request_block(hpack.Encoder())
    events = s.receive_data(frame(T.HEADERS, 0, 1, block[:3]) + fr.ping_frame(b"abcdefgh"))
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.PROTOCOL_ERROR
    )


def test_oversized_header_block_gets_enhance_your_calm() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    block = request_block(enc, [*CONNECT, ("x-big", "a" * 20000)])
    events = s.receive_data(frame(T.HEADERS, F.END_HEADERS, 1, block))
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.ENHANCE_YOUR_CALM
    )


def test_huge_decoded_header_list_gets_enhance_your_calm() -> None:
    # Indexed references to one big dynamic-table entry inflate far beyond the wire size.
    s = raw_server(settings=H2Settings(max_header_list_size=4096))
    enc = hpack.Encoder()
    block = request_block(enc, [*CONNECT] + [("x-rep", "b" * 1000)] * 10)
    assert len(block) < 4096
    events = s.receive_data(frame(T.HEADERS, F.END_HEADERS, 1, block))
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.ENHANCE_YOUR_CALM
    )


def test_bad_hpack_is_compression_error() -> None:
    s = raw_server()
    events = s.receive_data(frame(T.HEADERS, F.END_HEADERS, 1, b"\xff\xff\xff\xff\xff"))
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.COMPRESSION_ERROR
    )


def test_malformed_request_is_a_stream_error_only() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    data = frame(T.HEADERS, F.END_HEADERS, 1, enc.encode([(":method", "CONNECT"), ("Upper", "x")]))
    data += frame(T.HEADERS, F.END_HEADERS, 3, enc.encode(CONNECT))
    events = s.receive_data(data)
    assert events == [RequestReceived(3, tuple(CONNECT), False)]
    rst = [f for f in parse_frames(out(s)) if f[0] == T.RST_STREAM]
    assert [(f[2], fr.parse_u32(f[3])) for f in rst] == [(1, E.PROTOCOL_ERROR)]


def test_streams_beyond_the_limit_are_refused() -> None:
    s = raw_server(settings=H2Settings(max_concurrent_streams=2))
    enc = hpack.Encoder()
    data = b"".join(frame(T.HEADERS, F.END_HEADERS, sid, enc.encode(CONNECT)) for sid in (1, 3, 5))
    events = s.receive_data(data)
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [1, 3]
    rst = [(f[2], fr.parse_u32(f[3])) for f in parse_frames(out(s)) if f[0] == T.RST_STREAM]
    assert rst == [(5, E.REFUSED_STREAM)]


def test_rapid_reset_gets_goaway() -> None:
    clock = Clock()
    s = raw_server(clock, H2Settings(max_early_resets=10, early_reset_period=10.0))
    enc = hpack.Encoder()
    data = b""
    for i in range(11):
        sid = 2 * i + 1
        data += frame(T.HEADERS, F.END_HEADERS, sid, enc.encode(CONNECT)) + fr.rst_stream_frame(
            sid, E.CANCEL
        )
    events = s.receive_data(data)
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.ENHANCE_YOUR_CALM
    )
    # The same resets spread over time are fine.
    slow = raw_server(clock, H2Settings(max_early_resets=10, early_reset_period=10.0))
    enc = hpack.Encoder()
    for i in range(30):
        clock.now += 2
        sid = 2 * i + 1
        got = slow.receive_data(
            frame(T.HEADERS, F.END_HEADERS, sid, enc.encode(CONNECT))
            + fr.rst_stream_frame(sid, E.CANCEL)
        )
        assert not any(isinstance(e, ConnectionTerminated) for e in got)


def test_ping_is_answered_and_ping_flood_gets_goaway() -> None:
    clock = Clock()
    s = raw_server(clock)
    assert s.receive_data(fr.ping_frame(b"12345678")) == []
    assert parse_frames(out(s)) == [(T.PING, F.ACK, 0, b"12345678")]
    events = s.receive_data(fr.ping_frame(b"abcdefgh") * 150)
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.ENHANCE_YOUR_CALM
    )


def test_settings_flood_gets_goaway() -> None:
    s = raw_server()
    events = s.receive_data(fr.settings_frame([]) * 150)
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.ENHANCE_YOUR_CALM
    )


def test_empty_frame_flood_gets_goaway() -> None:
    s = raw_server()
    events = s.receive_data(frame(0x77, 0, 0) * 1500)
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.ENHANCE_YOUR_CALM
    )


def test_ping_ack_event_and_keepalive_api() -> None:
    c, s = pair()
    c.send_ping(b"keepaliv")
    pump(c, s)
    assert pump(s, c) == [PingAcked(b"keepaliv")]


def test_settings_changes_adjust_stream_windows() -> None:
    c, s = pair()
    sid = c.send_request(CONNECT)
    pump(c, s)
    s.send_response(sid, 200)
    pump(s, c)
    before = c.send_window(sid)
    events = c.receive_data(fr.settings_frame([(fr.SettingCode.INITIAL_WINDOW_SIZE, 1000)]))
    assert isinstance(events[0], RemoteSettingsChanged)
    assert c.send_window(sid) == min(before, 1000) == 1000
    events = c.receive_data(fr.settings_frame([(fr.SettingCode.INITIAL_WINDOW_SIZE, 1 << 31)]))
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.FLOW_CONTROL_ERROR
    )


def test_client_refuses_push_enabled_by_server() -> None:
    c = H2Connection(Role.CLIENT)
    c.initiate()
    events = c.receive_data(fr.settings_frame([(fr.SettingCode.ENABLE_PUSH, 1)]))
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.PROTOCOL_ERROR
    )


def test_window_update_events_and_overflow() -> None:
    c, s = pair()
    sid = c.send_request(CONNECT)
    pump(c, s)
    s.send_response(sid, 200)
    pump(s, c)
    assert c.receive_data(fr.window_update_frame(sid, 10)) == [WindowUpdated(sid)]
    events = c.receive_data(fr.window_update_frame(sid, fr.MAX_WINDOW))
    assert events == [StreamReset(sid, E.FLOW_CONTROL_ERROR, False)]
    events = c.receive_data(fr.window_update_frame(0, 0))
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.PROTOCOL_ERROR
    )


def test_goaway_refuses_unprocessed_streams_and_blocks_new_ones() -> None:
    c, s = pair()
    first = c.send_request(CONNECT)
    pump(c, s)
    second = c.send_request(CONNECT)
    s.close()
    events = pump(s, c)
    assert StreamReset(second, E.REFUSED_STREAM, True) in events
    terminated = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert terminated == [ConnectionTerminated(E.NO_ERROR, first, True, False, "")]
    assert not c.can_open_stream
    with pytest.raises(LocalProtocolError):
        c.send_request(CONNECT)
    assert c.stream_state(first) is State.OPEN  # the processed stream may finish


def test_server_refuses_new_streams_after_graceful_goaway() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    s.receive_data(frame(T.HEADERS, F.END_HEADERS, 1, enc.encode(CONNECT)))
    s.close()
    last = [fr.parse_goaway(f[3])[0] for f in parse_frames(out(s)) if f[0] == T.GOAWAY]
    assert last == [1]
    assert s.receive_data(frame(T.HEADERS, F.END_HEADERS, 3, enc.encode(CONNECT))) == []
    rst = [(f[2], fr.parse_u32(f[3])) for f in parse_frames(out(s)) if f[0] == T.RST_STREAM]
    assert rst == [(3, E.REFUSED_STREAM)]


def test_frames_on_reset_streams_are_ignored_but_count_against_the_window() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    s.receive_data(frame(T.HEADERS, F.END_HEADERS, 1, enc.encode(CONNECT)))
    s.send_response(1, 200)
    s.reset_stream(1)
    s.data_to_send()
    assert s.receive_data(frame(T.DATA, 0, 1, b"late" * 100)) == []
    assert not any(f[0] == T.RST_STREAM for f in parse_frames(out(s)))
    # DATA on a stream that never existed is a connection error.
    events = s.receive_data(frame(T.DATA, 0, 9, b"x"))
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.PROTOCOL_ERROR
    )


def test_client_rejects_server_initiated_streams() -> None:
    c, _ = pair()
    enc = hpack.Encoder()
    events = c.receive_data(frame(T.HEADERS, F.END_HEADERS, 2, enc.encode([(":status", "200")])))
    assert (
        isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == E.PROTOCOL_ERROR
    )


def test_informational_response_is_skipped() -> None:
    c, _s = pair()
    sid = c.send_request(CONNECT)
    enc = hpack.Encoder()
    c.receive_data(b"")
    events = c.receive_data(
        frame(T.HEADERS, F.END_HEADERS, sid, enc.encode([(":status", "100")]))
        + frame(T.HEADERS, F.END_HEADERS, sid, enc.encode([(":status", "200")]))
    )
    assert [type(e) for e in events] == [ResponseReceived]


def test_data_streams_across_reads_without_waiting_for_the_frame() -> None:
    s = raw_server()
    enc = hpack.Encoder()
    s.receive_data(frame(T.HEADERS, F.END_HEADERS, 1, enc.encode(CONNECT)))
    s.send_response(1, 200)
    payload = bytes(range(256)) * 100
    wire = frame(T.DATA, F.END_STREAM, 1, payload)
    got = bytearray()
    events: list[Event] = []
    for i in range(0, len(wire), 999):
        for e in s.receive_data(wire[i : i + 999]):
            events.append(e)
            if isinstance(e, DataReceived):
                got += e.data
    assert bytes(got) == payload
    assert isinstance(events[-1], StreamEnded)
    assert sum(isinstance(e, DataReceived) for e in events) > 20


def test_local_misuse_raises_local_protocol_error() -> None:
    c, s = pair()
    with pytest.raises(LocalProtocolError):
        s.send_request(CONNECT)
    with pytest.raises(LocalProtocolError):
        c.send_data(99, b"x")
    sid = c.send_request(CONNECT)
    pump(c, s)
    with pytest.raises(LocalProtocolError):
        s.send_response(sid, 100)
    s.send_response(sid, 200)
    with pytest.raises(LocalProtocolError):
        s.send_response(sid, 200)
    s.close(E.INTERNAL_ERROR)
    with pytest.raises(LocalProtocolError):
        s.send_data(sid, b"x")


def test_headers_flood_beyond_the_stream_limit_gets_goaway() -> None:
    s = raw_server(settings=H2Settings(max_concurrent_streams=1, max_early_resets=20))
    enc = hpack.Encoder()
    data = b"".join(
        frame(T.HEADERS, F.END_HEADERS, 2 * i + 1, enc.encode(CONNECT)) for i in range(30)
    )
    events = s.receive_data(data)
    assert (
        isinstance(events[-1], ConnectionTerminated)
        and events[-1].error_code == E.ENHANCE_YOUR_CALM
    )
