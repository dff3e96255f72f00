"""Volume on loopback: a 64 MiB transfer each way at once, and many concurrent streams."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

from controller.api.spiffe import SpiffeId
from ztunnel.hbone import CloseReason, HboneStream, RelayResult, relay

SERVER_ID = SpiffeId("cluster.local", "/ns/default/sa/server")
MiB = 1 << 20


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        app = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return ours, app


async def exchange(stream: HboneStream, payload: bytes) -> tuple[bytes, RelayResult]:
    """Send ``payload`` through the echo while reading the echo back concurrently."""
    ours, app = tcp_pair()
    task = asyncio.get_running_loop().create_task(relay(stream, ours))
    reader, writer = await asyncio.open_connection(sock=app)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), MiB):
            writer.write(view[i : i + MiB])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.get_running_loop().create_task(send())
    digest = hashlib.sha256()
    received = 0
    async with asyncio.timeout(60):
        while chunk := await reader.read(4 * MiB):
            digest.update(chunk)
            received += len(chunk)
        await sender
        result = await task
    writer.close()
    assert received == len(payload)
    return digest.digest(), result


async def test_64_mib_each_way(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    payload = os.urandom(MiB) * 64
    stream = await harness.pool.open_stream(
        client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
    )
    digest, result = await exchange(stream, payload)
    assert digest == hashlib.sha256(payload).digest()
    assert result == RelayResult(64 * MiB, 64 * MiB, CloseReason.COMPLETED, "")


async def test_many_concurrent_streams_share_pooled_connections(
    harness, client_cert, echo_port
) -> None:  # type: ignore[no-untyped-def]
    streams = await asyncio.gather(
        *(
            harness.pool.open_stream(
                client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
            )
            for _ in range(150)
        )
    )
    # At most 100 streams per connection: 150 concurrent streams need two.
    counts = sorted(c.streams for c in harness.pool.connections())
    assert counts == [50, 100]
    payloads = [os.urandom(64 * 1024 + i) for i in range(len(streams))]
    results = await asyncio.gather(
        *(exchange(s, p) for s, p in zip(streams, payloads, strict=True))
    )
    for (digest, result), payload in zip(results, payloads, strict=True):
        assert digest == hashlib.sha256(payload).digest()
        assert result.reason is CloseReason.COMPLETED
    assert len(harness.pool.connections()) == 2  # kept for reuse until idle
