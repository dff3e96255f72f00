"""The plaintext relay and socket helpers on loopback, on both event loops."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ztunnel.proxy.errors import UpstreamConnectError
from ztunnel.proxy.relay import ByteCounters, RelayResult, relay_sockets
from ztunnel.proxy.sockets import (
    Address,
    connect_upstream,
    listener_socket,
    local_address,
    peer_address,
    reset,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

BOTH_LOOPS = True  # see conftest.py


class Relay:
    """A listener that relays every accepted connection to ``upstream``."""

    def __init__(self, upstream: Address) -> None:
        self.sock = listener_socket("127.0.0.1", 0, transparent=False)
        self.addr = local_address(self.sock)
        self.upstream = upstream
        self.results: asyncio.Queue[RelayResult | BaseException] = asyncio.Queue()
        self.counters: list[ByteCounters] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(self.sock)
            t = asyncio.create_task(self._one(client))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _one(self, client: socket.socket) -> None:
        try:
            up = await connect_upstream(self.upstream, mark=None)
        except UpstreamConnectError as e:
            reset(client)
            await self.results.put(e)
            return
        c = ByteCounters()
        self.counters.append(c)
        try:
            await self.results.put(await relay_sockets(client, up, c))
        except asyncio.CancelledError as e:
            await self.results.put(e)
            raise


async def _server(handler: Handler) -> tuple[asyncio.Server, Address]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    return server, Address(host, port)


@pytest.fixture
async def relay_to() -> AsyncIterator[Callable[[Handler], Awaitable[Relay]]]:
    servers: list[asyncio.Server] = []
    tasks: list[asyncio.Task[None]] = []
    relays: list[Relay] = []

    async def make(handler: Handler) -> Relay:
        server, addr = await _server(handler)
        servers.append(server)
        relay = Relay(addr)
        relays.append(relay)
        tasks.append(asyncio.create_task(relay.serve()))
        return relay

    yield make
    for t in tasks:
        t.cancel()
    for r in relays:
        for t in list(r.tasks):
            t.cancel()
        r.sock.close()
    for s in servers:
        s.close()
    await asyncio.sleep(0)


async def test_bytes_intact_both_directions_with_half_close(
    relay_to: Callable[[Handler], Awaitable[Relay]],
) -> None:
    down_blob = os.urandom(3 << 20)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        while chunk := await r.read(1 << 16):
            h.update(chunk)
        # The client half-closed; the server can still answer.
        w.write(h.digest())
        w.write(down_blob)
        await w.drain()
        w.close()

    relay = await relay_to(handler)
    up_blob = os.urandom(5 << 20)
    r, w = await asyncio.open_connection(relay.addr.ip, relay.addr.port)
    w.write(up_blob)
    await w.drain()
    w.write_eof()
    digest = await r.readexactly(32)
    rest = await r.read()
    w.close()
    assert digest == hashlib.sha256(up_blob).digest()
    assert rest == down_blob
    result = await asyncio.wait_for(relay.results.get(), 5)
    assert isinstance(result, RelayResult)
    assert (result.from_client, result.to_client) == (len(up_blob), 32 + len(down_blob))
    assert result.error is None


async def test_backpressure_pauses_reading_without_loss(
    relay_to: Callable[[Handler], Awaitable[Relay]],
) -> None:
    """A server that reads slowly: the relay's buffers stay bounded and nothing is lost."""
    received = bytearray()
    started = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        started.set()
        await asyncio.sleep(0.5)  # let the sender fill every buffer on the way
        while chunk := await r.read(1 << 16):
            received.extend(chunk)
        w.close()

    relay = await relay_to(handler)
    blob = os.urandom(16 << 20)
    r, w = await asyncio.open_connection(relay.addr.ip, relay.addr.port)
    w.write(blob)
    await started.wait()
    await asyncio.sleep(0.3)
    # While the server is not reading, the relay must not have swallowed all 16 MiB.
    assert relay.counters[0].from_client < len(blob)
    await w.drain()
    w.write_eof()
    assert await r.read() == b""
    w.close()
    assert bytes(received) == blob


async def test_client_reset_resets_server(
    relay_to: Callable[[Handler], Awaitable[Relay]],
) -> None:
    got_reset = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.read()
        except ConnectionResetError:
            got_reset.set()
        w.close()

    relay = await relay_to(handler)
    sock = socket.create_connection((relay.addr.ip, relay.addr.port))
    sock.sendall(b"hello")
    await asyncio.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    await asyncio.wait_for(got_reset.wait(), 5)
    result = await asyncio.wait_for(relay.results.get(), 5)
    assert isinstance(result, RelayResult) and result.error is not None


async def test_cancelled_relay_resets_both_sides(
    relay_to: Callable[[Handler], Awaitable[Relay]],
) -> None:
    server_reset = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.read()
        except ConnectionResetError:
            server_reset.set()
        w.close()

    relay = await relay_to(handler)
    r, w = await asyncio.open_connection(relay.addr.ip, relay.addr.port)
    w.write(b"x")
    await w.drain()
    while not relay.tasks:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    for t in list(relay.tasks):
        t.cancel()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(r.read(), 5)
    await asyncio.wait_for(server_reset.wait(), 5)
    w.close()


async def test_connect_failure_names_destination() -> None:
    probe = listener_socket("127.0.0.1", 0, transparent=False)
    addr = local_address(probe)
    probe.close()  # nothing listens there now
    with pytest.raises(UpstreamConnectError) as info:
        await connect_upstream(addr, mark=None)
    assert str(addr) in info.value.message
    assert info.value.hint


async def test_upstream_socket_binds_requested_source() -> None:
    """What the app sees as the client address is the IP the ztunnel binds."""
    seen: asyncio.Future[Address] = asyncio.get_running_loop().create_future()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sock = w.get_extra_info("socket")
        seen.set_result(peer_address(sock))
        w.close()

    server, addr = await _server(handler)
    try:
        sock = await connect_upstream(addr, mark=None, bind_ip="127.0.0.42")
        sock.close()
        assert (await asyncio.wait_for(seen, 5)).ip == "127.0.0.42"
    finally:
        server.close()


async def test_reset_sends_rst() -> None:
    lsock = listener_socket("127.0.0.1", 0, transparent=False)
    addr = local_address(lsock)
    loop = asyncio.get_running_loop()
    try:
        r, w = await asyncio.open_connection(addr.ip, addr.port)
        accepted, _ = await loop.sock_accept(lsock)
        reset(accepted)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        w.close()
    finally:
        lsock.close()
