"""Protocol errors end in RST_STREAM or GOAWAY, never in an exception or a silent abort.

A scripted client with a valid certificate talks raw HTTP/2 over real TLS to
the real server: frames that used to raise inside the server (a rejected
request whose stream a later frame of the same read already closed), a stream
depending on itself, and peers too slow with their preface or SETTINGS ACK.
"""

from __future__ import annotations

import asyncio
import logging
import time

import hpack
import pytest

from ztunnel.hbone import HboneConfig
from ztunnel.hbone.http2 import frames as fr
from ztunnel.tls import client_context

ErrorCode = fr.ErrorCode
FrameType = fr.FrameType
DEADLINE = 1.0


@pytest.fixture
def hbone_config() -> HboneConfig:
    return HboneConfig(preface_timeout=DEADLINE, settings_ack_timeout=DEADLINE)


class RawPeer(asyncio.Protocol):
    """Keeps every byte the server sends, and when it closed."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.received.extend(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        out, pos, data = [], 0, bytes(self.received)
        while pos + 9 <= len(data):
            length, ftype, flags, sid = fr.unpack_header(data, pos)
            if pos + 9 + length > len(data):
                break
            out.append((ftype, flags, sid, data[pos + 9 : pos + 9 + length]))
            pos += 9 + length
        return out

    def has(self, ftype: int, sid: int | None = None) -> bool:
        return any(f[0] == ftype and (sid is None or f[2] == sid) for f in self.frames())

    async def wait_for(self, ftype: int, sid: int | None = None, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.has(ftype, sid):
                await asyncio.sleep(0.01)


async def connect(harness, client_cert) -> tuple[asyncio.Transport, RawPeer]:  # type: ignore[no-untyped-def]
    ctx = client_context(client_cert, harness.ca.bundle())
    transport, peer = await asyncio.get_running_loop().create_connection(
        RawPeer, "127.0.0.1", harness.port, ssl=ctx, server_hostname=None
    )
    return transport, peer


def headers(
    sid: int, authority: str, flags: int = fr.FLAG_END_HEADERS, prefix: bytes = b""
) -> bytes:
    block = prefix + hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])
    return fr.pack_header(len(block), FrameType.HEADERS, flags, sid) + block


HELLO = fr.PREFACE + fr.settings_frame([]) + fr.settings_ack_frame()
BAD_AUTHORITY = "10.99.0.1:80"  # not the address the connection went to: 400


@pytest.mark.parametrize(
    "closing",
    [fr.rst_stream_frame(1, ErrorCode.CANCEL), fr.window_update_frame(1, fr.MAX_WINDOW)],
    ids=["rst_stream", "stream_window_overflow"],
)
async def test_rejected_request_closed_by_a_later_frame_of_the_same_read(
    harness, client_cert, caplog, closing
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR)
    transport, peer = await connect(harness, client_cert)
    try:
        transport.write(HELLO + headers(1, BAD_AUTHORITY) + closing)
        await asyncio.sleep(0.2)
        transport.write(fr.ping_frame(b"stillok!"))
        await peer.wait_for(FrameType.PING)
        assert not peer.lost.done()
        assert not peer.has(FrameType.GOAWAY)
    finally:
        transport.close()
    if closing[3] == FrameType.WINDOW_UPDATE:
        rst = [f for f in peer.frames() if f[0] == FrameType.RST_STREAM]
        assert rst and fr.parse_u32(rst[0][3]) == ErrorCode.FLOW_CONTROL_ERROR
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_stream_depending_on_itself_is_reset_and_the_connection_lives(
    harness, client_cert, echo_port
) -> None:  # type: ignore[no-untyped-def]
    transport, peer = await connect(harness, client_cert)
    try:
        priority = (1).to_bytes(4, "big") + b"\x0f"
        flags = fr.FLAG_END_HEADERS | fr.FLAG_PRIORITY
        transport.write(HELLO + headers(1, f"127.0.0.1:{echo_port}", flags, priority))
        await peer.wait_for(FrameType.RST_STREAM, 1)
        rst = [f for f in peer.frames() if f[0] == FrameType.RST_STREAM]
        assert fr.parse_u32(rst[0][3]) == ErrorCode.PROTOCOL_ERROR
        transport.write(fr.ping_frame(b"stillok!"))
        await peer.wait_for(FrameType.PING)
        assert not peer.has(FrameType.GOAWAY)
    finally:
        transport.close()


async def test_preface_trickled_a_byte_at_a_time_is_cut_off(harness, client_cert) -> None:  # type: ignore[no-untyped-def]
    transport, peer = await connect(harness, client_cert)
    start = time.monotonic()
    try:
        for byte in fr.PREFACE:
            if peer.lost.done():
                break
            transport.write(bytes([byte]))
            await asyncio.sleep(0.1)
        async with asyncio.timeout(5):
            await peer.lost
    finally:
        transport.close()
    elapsed = time.monotonic() - start
    assert elapsed < len(fr.PREFACE) * 0.1  # before the preface could even finish
    assert elapsed >= DEADLINE * 0.9


async def test_settings_never_acknowledged_gets_settings_timeout(harness, client_cert) -> None:  # type: ignore[no-untyped-def]
    transport, peer = await connect(harness, client_cert)
    start = time.monotonic()
    try:
        transport.write(fr.PREFACE + fr.settings_frame([]))  # and never an ACK
        async with asyncio.timeout(5):
            await peer.lost
    finally:
        transport.close()
    assert DEADLINE * 0.9 <= time.monotonic() - start < DEADLINE + 3
    goaway = [f for f in peer.frames() if f[0] == FrameType.GOAWAY]
    assert goaway and fr.parse_goaway(goaway[0][3])[1] == ErrorCode.SETTINGS_TIMEOUT


async def test_prompt_peers_are_not_affected_by_the_deadlines(harness, client_cert) -> None:  # type: ignore[no-untyped-def]
    transport, peer = await connect(harness, client_cert)
    try:
        transport.write(HELLO)
        await asyncio.sleep(DEADLINE + 0.5)
        transport.write(fr.ping_frame(b"stillok!"))
        await peer.wait_for(FrameType.PING)
        assert not peer.lost.done() and not peer.has(FrameType.GOAWAY)
    finally:
        transport.close()
