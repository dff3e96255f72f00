"""Raw bytes both ways, for a connection that switched protocols (101, websocket).

Once the upstream answered 101 the waypoint no longer parses anything: it
copies each direction until its source ends, passing the end on as a
half-close, and returns when both directions ended. An error on either side
ends both.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["relay_raw"]

_READ = 64 * 1024
Side = tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, first: bytes) -> int:
    moved = 0
    if first:
        dst.write(first)
        moved += len(first)
    while data := await src.read(_READ):
        dst.write(data)
        moved += len(data)
        await dst.drain()
    if dst.can_write_eof():
        with contextlib.suppress(OSError, RuntimeError):
            dst.write_eof()
    await dst.drain()
    return moved


async def relay_raw(client: Side, upstream: Side) -> int:
    """Copies ``client`` <-> ``upstream`` (reader, writer, bytes already read);
    returns the bytes sent to the client."""
    c_reader, c_writer, c_tail = client
    u_reader, u_writer, u_tail = upstream
    to_upstream = asyncio.ensure_future(_pump(c_reader, u_writer, c_tail))
    to_client = asyncio.ensure_future(_pump(u_reader, c_writer, u_tail))
    try:
        done, pending = await asyncio.wait(
            {to_upstream, to_client}, return_when=asyncio.FIRST_EXCEPTION
        )
        if any(t.exception() is not None for t in done):
            for t in pending:
                t.cancel()
            c_writer.close()
            u_writer.close()
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
        return to_client.result() if to_client.done() and not to_client.cancelled() else 0
    finally:
        for t in (to_upstream, to_client):
            if not t.done():
                t.cancel()
