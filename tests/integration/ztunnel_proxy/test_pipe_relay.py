"""The splice(2) relay (ztunnel.proxy.pipes) on loopback TCP, on both event loops.

Two modes are covered: ``pipe`` (the splice(2) relay from the first byte) and
``auto`` (the ztunnel's same-node ``auto`` without pins: the Python relay
first, handed over to the splice(2) relay once the connection turns bulk).
The applications are blocking sockets in threads; the proxy sockets are real
TCP connections on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ztunnel.proxy.connections import ConnectionInfo, Direction, LiveConnection
from ztunnel.proxy.pipes import pipe_relay
from ztunnel.proxy.relay import ByteCounters, RelayResult
from ztunnel.proxy.sockets import Address
from ztunnel.proxy.splice import SameNodeSplice

BOTH_LOOPS = True  # see conftest.py

MODES = ("pipe", "auto")


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (blocking)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


class Proxied:
    """client app <-> [proxy] <-> server app, the proxy relaying in ``mode``."""

    def __init__(self, mode: str) -> None:
        self.client, self._pa = _pair()
        self._pb, self.server = _pair()
        self.counters = ByteCounters()
        self.conn: LiveConnection | None = None
        for sock in (self._pa, self._pb):
            sock.setblocking(False)
        self.task = asyncio.create_task(self._run(mode))

    async def _run(self, mode: str) -> RelayResult:
        if mode == "pipe":
            result = await pipe_relay(self._pa, self._pb, self.counters)
            assert result is not None
            return result
        info = ConnectionInfo(
            Direction.OUTBOUND, Address("127.0.0.1", 1), Address("127.0.0.1", 2), "same_node"
        )
        conn = self.conn = LiveConnection(id=1, info=info, authz=None)
        return await SameNodeSplice(None, promote=True).relay_then_splice(self._pa, self._pb, conn)

    def live_counts(self) -> tuple[int, int]:
        """What the connection registry shows for this connection now."""
        c = self.counters if self.conn is None else self.conn.counters
        return c.from_client, c.to_client

    async def result(self) -> RelayResult:
        return await asyncio.wait_for(self.task, 60)

    def close(self) -> None:
        self.task.cancel()
        self.client.close()
        self.server.close()


@pytest.fixture
async def proxied() -> AsyncIterator[Callable[[str], Proxied]]:
    made: list[Proxied] = []

    def make(mode: str) -> Proxied:
        p = Proxied(mode)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
        with contextlib.suppress(BaseException):
            await p.task


def _send_all_then_eof(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def _recv_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def _hash_until_eof(sock: socket.socket) -> tuple[int, bytes]:
    h, n = hashlib.sha256(), 0
    while chunk := sock.recv(1 << 20):
        h.update(chunk)
        n += len(chunk)
    return n, h.digest()


async def _threads(*calls: tuple[Callable[..., Any], tuple[Any, ...]]) -> list[Any]:
    return list(await asyncio.gather(*(asyncio.to_thread(f, *a) for f, a in calls)))


@pytest.mark.parametrize("mode", MODES)
async def test_64_mib_intact_both_ways_counts_exact(
    proxied: Callable[[str], Proxied], mode: str
) -> None:
    p = proxied(mode)
    up, down = os.urandom(64 << 20), os.urandom(64 << 20)
    got = await _threads(
        (_send_all_then_eof, (p.client, up)),
        (_send_all_then_eof, (p.server, down)),
        (_hash_until_eof, (p.server,)),
        (_hash_until_eof, (p.client,)),
    )
    assert got[2] == (len(up), hashlib.sha256(up).digest())
    assert got[3] == (len(down), hashlib.sha256(down).digest())
    result = await p.result()
    assert (result.from_client, result.to_client, result.error) == (len(up), len(down), None)
    assert p.live_counts() == (len(up), len(down))


def _answer_with_hash(sock: socket.socket) -> None:
    n, digest = _hash_until_eof(sock)
    sock.sendall(struct.pack("!Q", n) + digest)
    sock.close()


@pytest.mark.parametrize("mode", MODES)
async def test_half_close_under_load_loses_no_tail(
    proxied: Callable[[str], Proxied], mode: str
) -> None:
    for i in range(20):
        size = (3 << 20) + 7919 * i
        data = os.urandom(size)
        # client -> server, then EOF: the FIN must come after the last byte.
        p = proxied(mode)
        _, _, answer = await _threads(
            (_send_all_then_eof, (p.client, data)),
            (_answer_with_hash, (p.server,)),
            (_recv_all, (p.client,)),
        )
        assert answer == struct.pack("!Q", size) + hashlib.sha256(data).digest(), f"round {i}"
        assert (await p.result()).error is None
        # server -> client, then EOF, while the client still has its side open.
        p = proxied(mode)
        _, got = await _threads(
            (_send_all_then_eof, (p.server, data)),
            (_recv_all, (p.client,)),
        )
        assert got == data, f"round {i}: server->client tail lost"
        p.client.close()
        result = await p.result()
        assert result.to_client == size


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _expect_reset(sock: socket.socket) -> str:
    sock.settimeout(30)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["client", "server"])
async def test_reset_propagates(proxied: Callable[[str], Proxied], mode: str, side: str) -> None:
    p = proxied(mode)
    resetter, other = (p.client, p.server) if side == "client" else (p.server, p.client)
    # Under load: 4 MiB in flight from the resetting side first.
    await asyncio.to_thread(resetter.sendall, os.urandom(4 << 20))
    await asyncio.to_thread(_reset, resetter)
    assert await asyncio.to_thread(_expect_reset, other) == "reset"
    result = await p.result()
    assert result.error is not None and result.error.startswith(side)


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_resets_both_sides(proxied: Callable[[str], Proxied], mode: str) -> None:
    """A policy change that closes the connection cancels its relay: both ends see a RST."""
    p = proxied(mode)
    await asyncio.to_thread(p.client.sendall, os.urandom(2 << 20))
    await asyncio.sleep(0.05)
    p.task.cancel()
    outcomes = await _threads((_expect_reset, (p.client,)), (_expect_reset, (p.server,)))
    assert outcomes == ["reset", "reset"]
    with pytest.raises(asyncio.CancelledError):
        await p.task


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", MODES)
async def test_no_fd_left_behind(proxied: Callable[[str], Proxied], mode: str) -> None:
    async def one(end: str) -> None:
        p = proxied(mode)
        await asyncio.to_thread(p.client.sendall, os.urandom(2 << 20))
        if end == "clean":
            await asyncio.to_thread(p.client.shutdown, socket.SHUT_WR)
            await asyncio.to_thread(_answer_with_hash, p.server)
            await asyncio.to_thread(_recv_all, p.client)
            await p.result()
        elif end == "reset":
            await asyncio.to_thread(_reset, p.client)
            assert await asyncio.to_thread(_expect_reset, p.server) == "reset"
            await p.result()
        else:
            await asyncio.sleep(0.02)
            p.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await p.task
        p.client.close()
        p.server.close()

    await one("clean")  # warm-up: the loop's own fds (self-pipe, thread pool) settle
    before = _open_fds()
    for _ in range(5):
        for end in ("clean", "reset", "cancel"):
            await one(end)
    deadline = time.monotonic() + 5
    while _open_fds() > before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _open_fds() == before
