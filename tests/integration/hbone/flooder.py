"""A hostile HBONE client, run as its own process so its CPU is not the server's.

Usage: flooder.py HOST PORT CERT KEY CA KIND SECONDS AUTHORITY

It connects with a valid client certificate, sends the preface, then floods
with KIND frames (``window_update``: WINDOW_UPDATE(+1) on the connection;
``tiny_data``: 1-byte DATA frames on a CONNECT stream to AUTHORITY, within
flow control)
as fast as the server takes them. Whenever the server ends the connection it
reconnects (a tenth of a second later), until SECONDS have passed. Prints ``flooding`` once the first flood
write went out, then one line per connection: the GOAWAY error codes received,
``deadline`` when SECONDS ran out first, ``-`` when the server closed it
without a GOAWAY.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time

import hpack

from ztunnel.hbone.http2 import frames as fr

CHUNK_FRAMES = 4096


def _flood_chunk(kind: str) -> bytes:
    if kind == "window_update":
        return fr.window_update_frame(0, 1) * CHUNK_FRAMES
    if kind == "tiny_data":
        return (fr.data_header(1, 1, False) + b"x") * CHUNK_FRAMES
    raise SystemExit(f"unknown flood kind {kind!r}")


def _opening(kind: str, authority: str) -> bytes:
    head = fr.PREFACE + fr.settings_frame([])
    if kind != "tiny_data":
        return head
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])
    return head + fr.pack_header(len(block), fr.FrameType.HEADERS, fr.FLAG_END_HEADERS, 1) + block


def _goaway_codes(data: bytes) -> list[int | str]:
    codes: list[int | str] = []
    pos = 0
    while pos + 9 <= len(data):
        length, ftype, _, _ = fr.unpack_header(data, pos)
        if ftype == fr.FrameType.GOAWAY and pos + 9 + length <= len(data):
            codes.append(fr.parse_goaway(data[pos + 9 : pos + 9 + length])[1])
        pos += 9 + length
    return codes


class _Flood(asyncio.Protocol):
    """Keeps every byte the server sends: a reset must not lose the GOAWAY before it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.received.extend(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()


async def _one_connection(
    ctx: ssl.SSLContext,
    host: str,
    port: int,
    kind: str,
    authority: str,
    deadline: float,
    first: list[bool],
) -> list[int | str]:
    loop = asyncio.get_running_loop()
    transport, flood = await loop.create_connection(
        _Flood, host, port, ssl=ctx, server_hostname=None
    )
    chunk = _flood_chunk(kind)
    ended_by_deadline = False
    transport.write(_opening(kind, authority))
    while time.monotonic() < deadline and not flood.lost.done():
        transport.write(chunk)
        if first[0]:
            first[0] = False
            print("flooding", flush=True)
        await flood.can_write.wait()
        await asyncio.sleep(0)
    if not flood.lost.done():
        ended_by_deadline = True
        transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await flood.lost
    codes = _goaway_codes(bytes(flood.received))
    return codes if codes or not ended_by_deadline else ["deadline"]


async def main(argv: list[str]) -> None:
    host, port, cert, key, ca, kind, seconds, authority = argv
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    deadline = time.monotonic() + float(seconds)
    first = [True]
    while time.monotonic() < deadline:
        try:
            codes = await _one_connection(ctx, host, int(port), kind, authority, deadline, first)
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            print(f"error {exc!r}", flush=True)
            await asyncio.sleep(0.05)
            continue
        print(" ".join(map(str, codes)) or "-", flush=True)
        await asyncio.sleep(0.1)  # the same credential, back for more


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
