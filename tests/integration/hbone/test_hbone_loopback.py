"""Our HBONE client and server on loopback with real mTLS: bytes, half-close, statuses,
policy closes, cancellation, graceful shutdown and idle release."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest

from controller.api.spiffe import SpiffeId
from ztunnel.hbone import (
    CloseReason,
    ConnectRefused,
    HboneConfig,
    HboneConnectError,
    HboneStream,
    RelayResult,
    relay,
)

BOTH_LOOPS = True
CLIENT_ID = SpiffeId("cluster.local", "/ns/default/sa/client")
SERVER_ID = SpiffeId("cluster.local", "/ns/default/sa/server")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (unlike a socketpair, it can carry a reset)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        app = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return ours, app


async def app_side(
    stream: HboneStream,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[RelayResult]]:
    """Relay ``stream`` to one end of a loopback TCP connection; the test is the other end."""
    ours, app = tcp_pair()
    task = asyncio.get_running_loop().create_task(relay(stream, ours))
    reader, writer = await asyncio.open_connection(sock=app)
    return reader, writer, task


async def read_all(reader: asyncio.StreamReader, limit: float = 20.0) -> bytes:
    async with asyncio.timeout(limit):
        return await reader.read()


async def test_bytes_intact_both_ways_and_request_fields(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    stream = await harness.pool.open_stream(
        client_cert,
        "127.0.0.1",
        harness.port,
        SERVER_ID,
        f"127.0.0.1:{echo_port}",
        ("10.1.2.3", 4567),
    )
    assert stream.status == 200 and stream.peer_identity == SERVER_ID
    reader, writer, task = await app_side(stream)
    payload = os.urandom(3 << 20)
    writer.write(payload)
    writer.write_eof()
    assert await read_all(reader) == payload
    result = await task
    assert result == RelayResult(len(payload), len(payload), CloseReason.COMPLETED, "")
    writer.close()
    request = harness.policy.seen[0].request
    assert request.peer_identity == CLIENT_ID
    assert (request.host, request.port, request.l3_dst) == ("127.0.0.1", echo_port, "127.0.0.1")
    assert request.forwarded_for == ("10.1.2.3", 4567)
    await asyncio.sleep(0.05)
    assert harness.policy.results[0].reason is CloseReason.COMPLETED


async def test_server_speaks_first_and_half_close_is_kept(harness, client_cert) -> None:  # type: ignore[no-untyped-def]
    """An upstream that greets before reading, then reads until EOF and answers."""

    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        await writer.drain()
        got = await reader.read()  # until the client's FIN, relayed as END_STREAM
        writer.write(hashlib.sha256(got).digest())
        writer.close()

    server = await asyncio.start_server(greeter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        stream = await harness.pool.open_stream(
            client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{port}"
        )
        await asyncio.sleep(0.1)  # the greeting arrives before the relay starts
        reader, writer, task = await app_side(stream)
        assert await reader.readexactly(11) == b"220 hello\r\n"
        body = os.urandom(100_000)
        writer.write(body)
        writer.write_eof()
        assert await read_all(reader) == hashlib.sha256(body).digest()
        assert (await task).reason is CloseReason.COMPLETED
        writer.close()
    finally:
        server.close()


async def test_policy_denial_is_401(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    harness.policy.deny.add(CLIENT_ID)
    with pytest.raises(ConnectRefused) as info:
        await harness.pool.open_stream(
            client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
        )
    assert info.value.status == 401 and "authorization policy" in str(info.value)


async def test_unreachable_upstream_is_503(harness, client_cert) -> None:  # type: ignore[no-untyped-def]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(ConnectRefused) as info:
        await harness.pool.open_stream(
            client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{port}"
        )
    assert info.value.status == 503


async def test_authority_other_than_the_dialled_ip_is_400(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConnectRefused) as info:
        await harness.pool.open_stream(
            client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.2:{echo_port}"
        )
    assert info.value.status == 400
    assert harness.policy.seen == []  # refused before any handler ran


async def test_server_closes_streams_no_longer_allowed(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    stream = await harness.pool.open_stream(
        client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
    )
    reader, writer, task = await app_side(stream)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    assert harness.server.close_streams(lambda s: s.request.peer_identity == CLIENT_ID) == 1
    result = await asyncio.wait_for(task, 5)
    assert result.reason is CloseReason.PEER_RESET and result.bytes_up == 4
    with pytest.raises(ConnectionResetError):
        await read_all(reader)  # the app sees a reset, not a clean end
    writer.close()
    await asyncio.sleep(0.05)
    assert harness.policy.results[-1].reason is CloseReason.CLOSED


async def test_cancelling_the_client_relay_resets_the_server_side(
    harness, client_cert, echo_port
) -> None:  # type: ignore[no-untyped-def]
    stream = await harness.pool.open_stream(
        client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
    )
    reader, writer, task = await app_side(stream)
    writer.write(b"x")
    await reader.readexactly(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.result is not None and stream.result.reason is CloseReason.CANCELLED
    for _ in range(50):
        if harness.policy.results:
            break
        await asyncio.sleep(0.02)
    assert harness.policy.results[0].reason is CloseReason.PEER_RESET
    writer.close()
    assert harness.pool.streams() == [] and harness.server.streams() == []


async def test_graceful_shutdown_lets_streams_finish(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    stream = await harness.pool.open_stream(
        client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
    )
    reader, writer, task = await app_side(stream)
    shutdown = asyncio.get_running_loop().create_task(harness.server.shutdown(grace=10))
    await asyncio.sleep(0.1)
    with pytest.raises(HboneConnectError):  # GOAWAY: no new streams anywhere
        await harness.pool.open_stream(
            client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
        )
    writer.write(b"still flowing")
    writer.write_eof()
    assert await read_all(reader) == b"still flowing"
    assert (await task).reason is CloseReason.COMPLETED
    await asyncio.wait_for(shutdown, 5)  # returns as soon as the last stream ended
    assert harness.server.connection_count == 0
    writer.close()


async def test_shutdown_grace_expiry_resets_streams(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    stream = await harness.pool.open_stream(
        client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
    )
    _, writer, task = await app_side(stream)
    await harness.pool.shutdown(grace=0.2)
    assert (await task).reason is CloseReason.SHUTDOWN
    writer.close()


@pytest.mark.parametrize("hbone_config", [HboneConfig(pool_idle_timeout=0.3)])
async def test_idle_connections_are_released(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    for _ in range(2):  # the second stream reuses the connection
        stream = await harness.pool.open_stream(
            client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
        )
        reader, writer, task = await app_side(stream)
        writer.write_eof()
        await read_all(reader)
        await task
        writer.close()
        assert len(harness.pool.connections()) == 1
    for _ in range(100):
        if not harness.pool.connections():
            break
        await asyncio.sleep(0.02)
    assert harness.pool.connections() == []
    assert harness.server.connection_count == 0


@contextlib.asynccontextmanager
async def silent_tls_server(ca, cert) -> AsyncIterator[int]:  # type: ignore[no-untyped-def]
    """Completes the TLS handshake (ALPN h2), then never sends a byte."""
    from ztunnel.tls import server_context

    ctx = server_context(cert, ca.bundle())
    server = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_keepalive_closes_a_silent_connection(ca, client_cert, server_cert) -> None:  # type: ignore[no-untyped-def]
    from ztunnel.hbone import HboneClientPool

    config = HboneConfig(keepalive_interval=0.2, keepalive_timeout=0.2, stream_open_timeout=5)
    pool = HboneClientPool(lambda: ca.bundle(), config=config)
    async with silent_tls_server(ca, server_cert) as port:
        opening = asyncio.get_running_loop().create_task(
            pool.open_stream(client_cert, "127.0.0.1", port, SERVER_ID, "127.0.0.1:1")
        )
        with pytest.raises(HboneConnectError, match="keepalive PING"):
            await asyncio.wait_for(opening, 3)
    assert pool.connections() == []


async def test_relay_takes_over_an_existing_transport(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    """A listener that already wrapped the app socket in a transport can hand it over."""
    stream = await harness.pool.open_stream(
        client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
    )
    ours, app = tcp_pair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    transport.pause_reading()
    task = loop.create_task(relay(stream, transport))
    reader, writer = await asyncio.open_connection(sock=app)
    writer.write(b"handed over")
    writer.write_eof()
    assert await read_all(reader) == b"handed over"
    assert (await task).reason is CloseReason.COMPLETED
    writer.close()
