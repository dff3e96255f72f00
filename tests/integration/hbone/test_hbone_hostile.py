"""Hostile HTTP/2 clients (with valid certificates) against the real server task.

Each attack ends the attacker's connection with GOAWAY and the expected error
code, while a stream opened beforehand on another connection keeps working and
the server keeps accepting new clients.
"""

from __future__ import annotations

import asyncio
import socket

import hpack
import pytest

from controller.api.spiffe import SpiffeId
from ztunnel.hbone import HboneClientPool, relay
from ztunnel.hbone.http2 import frames as fr
from ztunnel.tls import client_context

SERVER_ID = SpiffeId("cluster.local", "/ns/default/sa/server")
E = fr.ErrorCode
T = fr.FrameType
F = fr.Flag


def _headers(enc: hpack.Encoder, sid: int, authority: str) -> bytes:
    block = enc.encode([(":method", "CONNECT"), (":authority", authority)])
    return fr.pack_header(len(block), T.HEADERS, F.END_HEADERS, sid) + block


def rapid_reset(authority: str) -> bytes:
    enc = hpack.Encoder()
    return b"".join(
        _headers(enc, 2 * i + 1, authority) + fr.rst_stream_frame(2 * i + 1, E.CANCEL)
        for i in range(300)
    )


def continuation_flood(authority: str) -> bytes:
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])
    data = fr.pack_header(1, T.HEADERS, 0, 1) + block[:1]
    return data + fr.pack_header(0, T.CONTINUATION, 0, 1) * 1000


def ping_flood(authority: str) -> bytes:
    return fr.ping_frame(b"flooding") * 1000


def settings_flood(authority: str) -> bytes:
    return fr.settings_frame([(fr.SettingCode.INITIAL_WINDOW_SIZE, 1000)]) * 1000


def oversized_frame(authority: str) -> bytes:
    return fr.pack_header(4 << 20, T.DATA, 0, 1) + b"\0" * 1024


def window_overflow(authority: str) -> bytes:
    return fr.window_update_frame(0, fr.MAX_WINDOW)


def headers_too_large(authority: str) -> bytes:
    block = hpack.Encoder().encode(
        [(":method", "CONNECT"), (":authority", authority), ("x-a", "a" * 30000)]
    )
    return fr.pack_header(len(block), T.HEADERS, F.END_HEADERS, 1) + block


def goaway_codes(data: bytes) -> list[int]:
    codes, pos = [], 0
    while pos + 9 <= len(data):
        length, ftype, _, _ = fr.unpack_header(data, pos)
        if ftype == T.GOAWAY and pos + 9 + length <= len(data):
            codes.append(fr.parse_goaway(data[pos + 9 : pos + 9 + length])[1])
        pos += 9 + length
    return codes


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        (rapid_reset, E.ENHANCE_YOUR_CALM),
        (continuation_flood, E.ENHANCE_YOUR_CALM),
        (ping_flood, E.ENHANCE_YOUR_CALM),
        (settings_flood, E.ENHANCE_YOUR_CALM),
        (headers_too_large, E.ENHANCE_YOUR_CALM),
        (oversized_frame, E.FRAME_SIZE_ERROR),
        (window_overflow, E.FLOW_CONTROL_ERROR),
    ],
)
async def test_attack_gets_goaway_and_others_are_unaffected(
    harness, client_cert, echo_port, attack, code
) -> None:  # type: ignore[no-untyped-def]
    authority = f"127.0.0.1:{echo_port}"
    bystander = await harness.pool.open_stream(
        client_cert, "127.0.0.1", harness.port, SERVER_ID, authority
    )
    ours, app = socket.socketpair()
    relaying = asyncio.get_running_loop().create_task(relay(bystander, ours))
    reader, writer = await asyncio.open_connection(sock=app)

    ctx = client_context(client_cert, harness.ca.bundle())
    a_reader, a_writer = await asyncio.open_connection(
        "127.0.0.1", harness.port, ssl=ctx, server_hostname=None
    )
    a_writer.write(fr.PREFACE + fr.settings_frame([]) + attack(authority))
    received = b""
    async with asyncio.timeout(10):
        try:
            while chunk := await a_reader.read(65536):
                received += chunk
        except ConnectionError:
            pass
    a_writer.close()
    assert code in goaway_codes(received)

    writer.write(b"still here")
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
    writer.close()
    bystander.close()
    await relaying

    fresh = HboneClientPool(lambda: harness.ca.bundle(), config=harness.config)
    try:
        stream = await fresh.open_stream(
            client_cert, "127.0.0.1", harness.port, SERVER_ID, authority
        )
        assert stream.status == 200
        stream.close()
    finally:
        await fresh.shutdown(grace=0.2)
