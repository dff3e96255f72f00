"""The ztunnel's socket helpers on loopback, in both address families (issue 9 §2).

One wildcard listener serves IPv4 and IPv6 peers and reports IPv4 ones as
plain IPv4; upstream connects pick the destination's family; a transparent
bind of the other family falls back to the node's own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from ztunnel.proxy.sockets import (
    Address,
    connect_to_pod,
    connect_upstream,
    listener_socket,
    local_address,
    peer_address,
)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = listener_socket("0.0.0.0", 0, transparent=False)
    try:
        yield sock
    finally:
        sock.close()


def test_wildcard_listener_is_one_dual_stack_socket(listener: socket.socket) -> None:
    assert listener.family == socket.AF_INET6
    assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    assert listener.getsockname()[0] == "::"


async def _accept_from(listener: socket.socket, host: str) -> tuple[Address, Address, Address]:
    loop = asyncio.get_running_loop()
    port = listener.getsockname()[1]
    client = await connect_upstream(Address(host, port), mark=None, timeout=5)
    with client:
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
        with conn:
            mine = client.getsockname()[:2]
            return peer_address(conn), local_address(conn), Address(str(mine[0]), int(mine[1]))


async def test_ipv4_peer_of_the_dual_stack_listener_reads_as_ipv4(listener: socket.socket) -> None:
    peer, local, client = await _accept_from(listener, "127.0.0.1")
    assert peer == client and peer.ip == "127.0.0.1"
    assert local == Address("127.0.0.1", listener.getsockname()[1])


async def test_ipv6_peer_of_the_dual_stack_listener(listener: socket.socket) -> None:
    peer, local, client = await _accept_from(listener, "::1")
    assert peer == client and peer.ip == "::1"
    assert local == Address("::1", listener.getsockname()[1])
    assert str(local) == f"[::1]:{local.port}"


def test_specific_addresses_listen_in_their_own_family_only() -> None:
    v6 = listener_socket("::1", 0, transparent=False)
    v4 = listener_socket("127.0.0.1", 0, transparent=False)
    with v6, v4:
        assert v6.family == socket.AF_INET6
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert v4.family == socket.AF_INET


class _Dial:
    mark: int | None = None
    transparent = True
    connect_timeout = 5.0


async def test_connect_to_pod_binds_the_client_only_in_the_same_family(
    listener: socket.socket,
) -> None:
    loop = asyncio.get_running_loop()
    port = listener.getsockname()[1]
    # IPv6 client address, IPv4 pod: the socket cannot bind one family and reach
    # the other, so it comes from the node (no bind) instead of failing.
    sock = await connect_to_pod(_Dial(), Address("127.0.0.1", port), "::1")
    with sock, contextlib.ExitStack() as stack:
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
        stack.enter_context(conn)
        assert sock.family == socket.AF_INET
        assert peer_address(conn).ip == "127.0.0.1"


@pytest.mark.skipif(os.geteuid() != 0, reason="IPV6_TRANSPARENT needs CAP_NET_ADMIN")
async def test_connect_to_pod_binds_an_ipv6_client_transparently(listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    port = listener.getsockname()[1]
    sock = await connect_to_pod(_Dial(), Address("::1", port), "::1")
    with sock, contextlib.ExitStack() as stack:
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
        stack.enter_context(conn)
        assert sock.family == socket.AF_INET6
        assert peer_address(conn).ip == "::1"
