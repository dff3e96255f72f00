"""Request bodies stream through the waypoint: uploads of any size, early
refusals that never upload, and full-duplex gRPC streams."""

from __future__ import annotations

import asyncio
import hashlib
import struct

import h2.config
import h2.connection
import h2.events
import pytest

from tests.support.waypoint_env import Env, open_tunnel

pytestmark = pytest.mark.slow

BIG = 24 * 1024 * 1024  # three times the old whole-body limit


def _payload(size: int) -> bytes:
    return hashlib.shake_256(b"veil").digest(size)


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(
        line.split(b":", 1)[1] for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ))  # fmt: skip
    return head, await reader.readexactly(length)


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_a_large_upload_streams_through_intact(env: Env, framing: str) -> None:
    body = _payload(BIG)
    reader, writer = await open_tunnel(env)
    if framing == "chunked":
        writer.write(b"POST /upload HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
    else:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % BIG)
    async with asyncio.timeout(60):
        for i in range(0, BIG, 1 << 20):
            piece = body[i : i + (1 << 20)]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
            await writer.drain()
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
        head, answer = await _answer(reader)
    assert head.startswith(b"HTTP/1.1 200")
    assert answer == f"{BIG} {hashlib.sha256(body).hexdigest()}\n".encode()
    writer.close()


async def test_a_refused_request_is_answered_before_its_body_is_sent(env: Env) -> None:
    """Expect: 100-continue on a request the policy refuses: 403 at once, no
    "100 Continue", nothing forwarded, and the connection closes."""
    reader, writer = await open_tunnel(env)
    writer.write(
        b"POST /pay HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1073741824\r\n\r\n"
    )
    async with asyncio.timeout(10):
        head, answer = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 403") and answer == b"RBAC: access denied"
        assert await reader.read() == b""  # closed: the body will never be read
    assert all(r["path"] != "/pay" or r["method"] != "POST" for r in env.app.seen)
    writer.close()


def _grpc_message(data: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(data)) + data


async def test_a_grpc_stream_runs_both_ways_at_once(env: Env) -> None:
    """Each message is echoed before the next is sent: impossible unless the
    request body streams through the waypoint and the response streams back."""
    reader, writer = await open_tunnel(env, 9090)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (":method", "POST"),
            (":path", "/veil.test.Echo/Chat"),
            (":scheme", "http"),
            (":authority", "payments:9090"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    got = b""
    trailers: dict[bytes, bytes] = {}
    ended = False

    async def pump_until(pred: object) -> None:
        nonlocal got, ended
        while not pred():  # type: ignore[operator]
            data = await reader.read(65536)
            assert data, "the waypoint closed the connection"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    got += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers.update(dict(ev.headers))
                elif isinstance(ev, h2.events.StreamEnded):
                    ended = True
                elif isinstance(ev, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {ev.error_code}")
            writer.write(conn.data_to_send())

    async with asyncio.timeout(15):
        for n in range(3):
            message = f"message {n}".encode()
            conn.send_data(1, _grpc_message(message))
            writer.write(conn.data_to_send())
            want = _grpc_message(b"echo " + message)
            await pump_until(lambda want=want: got.endswith(want))
        conn.end_stream(1)
        writer.write(conn.data_to_send())
        await pump_until(lambda: ended)
    assert trailers[b"grpc-status"] == b"0"
    writer.close()


async def test_refused_http2_uploads_give_their_window_back(env: Env) -> None:
    """Bodies of refused streams are never read; their bytes must still be
    acknowledged, or the connection's window shrinks with each one and the
    whole HTTP/2 connection stalls. 20 refused 40 KB uploads, then a GET."""
    reader, writer = await open_tunnel(env)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    head = [(":scheme", "http"), (":authority", "payments"), (":path", "/pay")]
    statuses: dict[int, int] = {}
    ended: set[int] = set()

    async def read_until(pred: object) -> None:
        while not pred():  # type: ignore[operator]
            data = await reader.read(65536)
            assert data, "the waypoint closed the connection"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    statuses[ev.stream_id] = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    ended.add(ev.stream_id)
            writer.write(conn.data_to_send())

    body = b"x" * 40_000
    async with asyncio.timeout(20):
        for _ in range(20):
            # Wait for the window a refused stream's bytes took to come back.
            await read_until(lambda: conn.outbound_flow_control_window >= len(body))
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "POST"), *head])
            for i in range(0, len(body), 16_000):  # frames within the 16 KiB maximum
                piece = body[i : i + 16_000]
                conn.send_data(sid, piece, end_stream=i + 16_000 >= len(body))
            writer.write(conn.data_to_send())
            await read_until(lambda sid=sid: sid in ended)
            assert statuses[sid] == 403
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), *head], end_stream=True)
        writer.write(conn.data_to_send())
        await read_until(lambda sid=sid: sid in ended)
    assert statuses[sid] == 200
    writer.close()


def _ws_frame(text: bytes) -> bytes:
    """A masked client text frame (RFC 6455), payload under 126 bytes."""
    mask = b"\x11\x22\x33\x44"
    return (
        bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    )


_HANDSHAKE = (
    b"GET %s HTTP/1.1\r\nHost: payments\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def test_a_websocket_switches_and_relays_both_ways(env: Env) -> None:
    reader, writer = await open_tunnel(env)
    # The first frame rides in the same write as the handshake: the waypoint
    # must pass on what followed the request, not drop it.
    writer.write(_HANDSHAKE % b"/pay/ws" + _ws_frame(b"one"))
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # the RFC 6455 example key's accept
        assert await reader.readexactly(10) == b"\x81\x08echo one"
        writer.write(_ws_frame(b"two"))
        assert await reader.readexactly(10) == b"\x81\x08echo two"
        writer.write(b"\x88\x80\x00\x00\x00\x00")  # close
        assert (await reader.readexactly(2))[0] == 0x88  # the server's close
    writer.close()
    assert any(r["path"] == "/pay/ws" for r in env.app.seen)


async def test_a_refused_upgrade_is_a_plain_403(env: Env) -> None:
    reader, writer = await open_tunnel(env)
    writer.write(_HANDSHAKE % b"/internal/ws")
    async with asyncio.timeout(10):
        head, answer = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 403") and answer == b"RBAC: access denied"
        assert await reader.read() == b""
    writer.close()


async def test_an_upgrade_the_upstream_declines_is_answered_plainly(env: Env) -> None:
    reader, writer = await open_tunnel(env)
    writer.write(_HANDSHAKE % b"/pay/plain")
    async with asyncio.timeout(10):
        head, answer = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 200") and answer == b"payments saw GET /pay/plain\n"
        assert await reader.read() == b""
    writer.close()
