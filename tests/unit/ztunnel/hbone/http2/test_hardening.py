"""Abuse budgets, self-dependency and turn-sized decoding of the sans-IO connection."""

from __future__ import annotations

import hpack
import pytest

from ztunnel.hbone.http2 import frames as fr
from ztunnel.hbone.http2.connection import H2Connection, Role
from ztunnel.hbone.http2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamReset,
)
from ztunnel.hbone.http2.settings import Budget, H2Settings

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.7:8080")]
ErrorCode = fr.ErrorCode
FrameType = fr.FrameType


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return fr.pack_header(len(payload), ftype, flags, sid) + payload


def sent_frames(conn: H2Connection) -> list[tuple[int, int, int, bytes]]:
    data = b"".join(bytes(x) for x in conn.data_to_send())
    frames, pos = [], 0
    while pos < len(data):
        length, ftype, flags, sid = fr.unpack_header(data, pos)
        frames.append((ftype, flags, sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames


def server(clock: Clock | None = None, settings: H2Settings | None = None) -> H2Connection:
    s = H2Connection(Role.SERVER, settings, clock=clock or Clock())
    s.initiate()
    s.data_to_send()
    assert not s.preface_received
    s.receive_data(fr.PREFACE + fr.settings_frame([]))
    assert s.preface_received
    s.data_to_send()
    return s


def open_tunnel(s: H2Connection, enc: hpack.Encoder, sid: int = 1) -> None:
    events = s.receive_data(frame(FrameType.HEADERS, fr.FLAG_END_HEADERS, sid, enc.encode(CONNECT)))
    assert isinstance(events[0], RequestReceived)
    s.send_response(sid, 200)
    s.data_to_send()


def calm(events: list[Event]) -> bool:
    last = events[-1] if events else None
    return isinstance(last, ConnectionTerminated) and last.error_code == ErrorCode.ENHANCE_YOUR_CALM


def test_window_update_flood_gets_enhance_your_calm() -> None:
    s = server()
    open_tunnel(s, hpack.Encoder())
    flood = fr.window_update_frame(1, 1) * 3000 + fr.window_update_frame(0, 1) * 3000
    events = s.receive_data(flood)
    assert calm(events)
    goaway = [f for f in sent_frames(s) if f[0] == FrameType.GOAWAY]
    assert fr.parse_goaway(goaway[0][3])[1] == ErrorCode.ENHANCE_YOUR_CALM


def test_window_updates_at_a_steady_legitimate_rate_are_fine() -> None:
    clock = Clock()
    s = server(clock)
    open_tunnel(s, hpack.Encoder())
    for _ in range(20):  # 20 s at 2,500 per second, under the 5,000 budget
        events = s.receive_data(fr.window_update_frame(1, 1) * 2500)
        assert not any(isinstance(e, ConnectionTerminated) for e in events)
        clock.now += 1.0
    assert not s.closed


def test_tiny_data_flood_gets_enhance_your_calm() -> None:
    s = server()
    open_tunnel(s, hpack.Encoder())
    delivered = 0
    events: list[Event] = []
    for _ in range(25_000):
        events = s.receive_data(frame(FrameType.DATA, 0, 1, b"x"))
        for event in events:
            if isinstance(event, DataReceived):
                delivered += len(event.data)
                s.acknowledge_received_data(1, len(event.data))
        if s.closed:
            break
    assert calm(events)
    assert delivered <= H2Settings().max_tiny_data_per_second


def test_large_data_frames_do_not_spend_the_tiny_budget() -> None:
    s = server(settings=H2Settings(max_tiny_data_per_second=10))
    open_tunnel(s, hpack.Encoder())
    for _ in range(100):
        events = s.receive_data(frame(FrameType.DATA, 0, 1, b"y" * 1000))
        s.acknowledge_received_data(1, 1000)
        assert not any(isinstance(e, ConnectionTerminated) for e in events)


@pytest.mark.parametrize(
    "late",
    [
        fr.window_update_frame(1, 100),
        fr.rst_stream_frame(1, ErrorCode.CANCEL),
        frame(FrameType.DATA, 0, 1, b"z"),
    ],
    ids=["window_update", "rst_stream", "tiny_data"],
)
def test_frames_on_closed_streams_have_a_budget(late: bytes) -> None:
    s = server()
    open_tunnel(s, hpack.Encoder())
    s.reset_stream(1)
    s.data_to_send()
    assert s.receive_data(late * 100) == []  # a few in flight are normal
    assert calm(s.receive_data(late * 3000))


def test_data_on_a_forgotten_closed_stream_cannot_buy_unbounded_resets() -> None:
    s = server(settings=H2Settings(reset_memory=1))
    enc = hpack.Encoder()
    open_tunnel(s, enc, 1)
    open_tunnel(s, enc, 3)
    s.reset_stream(1)
    s.reset_stream(3)  # stream 1 drops out of the reset memory
    s.data_to_send()
    events = s.receive_data(frame(FrameType.DATA, 0, 1, b"q") * 3000)
    assert calm(events)
    resets = [f for f in sent_frames(s) if f[0] == FrameType.RST_STREAM]
    assert len(resets) <= H2Settings().max_closed_stream_frames_per_second


def test_headers_depending_on_their_own_stream_are_a_stream_error() -> None:
    s = server()
    enc = hpack.Encoder()
    priority = (1).to_bytes(4, "big") + b"\x10"  # depends on stream 1, weight 17
    block = priority + enc.encode(CONNECT)
    flags = fr.FLAG_END_HEADERS | fr.FLAG_PRIORITY
    assert s.receive_data(frame(FrameType.HEADERS, flags, 1, block)) == []
    rst = [f for f in sent_frames(s) if f[0] == FrameType.RST_STREAM]
    assert rst[0][2] == 1 and fr.parse_u32(rst[0][3]) == ErrorCode.PROTOCOL_ERROR
    # The connection goes on, and its HPACK state stayed in step.
    events = s.receive_data(frame(FrameType.HEADERS, fr.FLAG_END_HEADERS, 3, enc.encode(CONNECT)))
    assert isinstance(events[0], RequestReceived) and events[0].stream_id == 3


def test_priority_frame_depending_on_its_own_stream_is_a_stream_error() -> None:
    s = server()
    open_tunnel(s, hpack.Encoder())
    events = s.receive_data(frame(FrameType.PRIORITY, 0, 1, (1).to_bytes(4, "big") + b"\x00"))
    assert events == [StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)]
    rst = [f for f in sent_frames(s) if f[0] == FrameType.RST_STREAM]
    assert rst[0][2] == 1 and fr.parse_u32(rst[0][3]) == ErrorCode.PROTOCOL_ERROR
    # Another stream as the dependency is fine (and ignored).
    s.receive_data(frame(FrameType.PRIORITY, 0, 3, (1).to_bytes(4, "big") + b"\x00"))
    assert not s.closed


def test_receive_some_stops_at_a_frame_boundary_and_resumes() -> None:
    whole = server()
    parts = server()
    payload = fr.ping_frame(b"12345678") * 50 + frame(FrameType.HEADERS, 0, 0, b"")[:4]
    expected = whole.receive_data(payload)
    events: list[Event] = []
    rest = memoryview(payload)
    turns = 0
    while rest:
        got, used = parts.receive_some(rest, max_frames=16)
        events += got
        rest = rest[used:]
        turns += 1
        assert turns < 20
    assert turns == 4  # 16 + 16 + 16 + 2 PINGs and the partial header
    assert events == expected
    assert parts.data_to_send() and b"".join(map(bytes, whole.data_to_send()))


def test_settings_acknowledgement_is_tracked() -> None:
    c = H2Connection(Role.CLIENT)
    c.initiate()
    assert not c.settings_acknowledged
    events = c.receive_data(fr.settings_frame([]) + fr.settings_ack_frame())
    assert events == [RemoteSettingsChanged(fr.MAX_WINDOW, 65535, 16384)]
    assert c.settings_acknowledged and c.preface_received


def test_budget_refills_over_time() -> None:
    budget = Budget(rate=10, burst=10)
    assert not any(budget.spend(0.0) for _ in range(10))
    assert budget.spend(0.0)
    assert not budget.spend(1.0)  # a second later the bucket refilled
