"""The HBONE listener end to end on loopback: real controller, real certificates,
node-a's HBONE client pool talking to node-b's ztunnel, a real app behind it."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest

from tests.support.loopback_mesh import (
    CHECKOUT,
    CHECKOUT_IP,
    LEGACY_IP,
    OTHER,
    OTHER_IP,
    PAYMENTS,
    PAYMENTS_IP,
    AccessLog,
    App,
    Mesh,
    default_doc,
    open_tunnel,
)
from ztunnel.hbone import ConnectRefused


async def test_allowed_tunnel_is_intact_and_app_sees_client_ip(
    mesh: Mesh, app: App, access_log: AccessLog
) -> None:
    node_a, node_b = await mesh.start_pair()
    t = await open_tunnel(node_a, node_b, app.port)
    assert await t.reader.readline() == f"peer {CHECKOUT_IP}\n".encode()
    blob = os.urandom(4 << 20)
    t.writer.write(blob)
    await t.writer.drain()
    echoed = await t.reader.readexactly(len(blob))
    assert echoed == blob

    # The admin API lists the live connection with both identities.
    async with aiohttp.ClientSession() as http:
        host, port = node_b.ops.addresses["admin"]
        async with http.get(f"http://{host}:{port}/config_dump") as resp:
            dump = await resp.json()
    (conn,) = [c for c in dump["connections"] if c["direction"] == "inbound"]
    assert conn["src_identity"] == str(CHECKOUT)
    assert conn["dst_identity"] == str(PAYMENTS)
    assert conn["src"].startswith(CHECKOUT_IP)
    assert conn["bytes_received"] >= len(blob)
    # A held inbound connection runs on transport callbacks: no task (and no
    # coroutine frames) per connection on the destination ztunnel.
    assert node_b.inbound.server.handlers_running == 0

    t.writer.write_eof()
    assert await t.reader.read() == b""
    t.writer.close()
    await asyncio.wait_for(t.task, 5)
    lines = [json.loads(line) for line in access_log.lines]
    inbound = [e for e in lines if e["direction"] == "inbound"]
    assert inbound and inbound[-1]["verdict"] == "allow"
    assert inbound[-1]["bytes_received"] == len(blob)
    assert inbound[-1]["src_identity"] == str(CHECKOUT)


async def test_denied_identity_gets_401_and_app_sees_nothing(
    mesh: Mesh, app: App, access_log: AccessLog
) -> None:
    node_a, node_b = await mesh.start_pair()
    with pytest.raises(ConnectRefused) as info:
        await open_tunnel(node_a, node_b, app.port, identity=OTHER, forwarded=(OTHER_IP, 1))
    assert info.value.status == 401
    assert app.peers == []
    denied = [json.loads(line) for line in access_log.lines]
    assert any(e["verdict"] == "deny" and e["response_flags"] == "RBAC" for e in denied)


async def test_forwarded_address_must_belong_to_the_peer_identity(mesh: Mesh, app: App) -> None:
    """checkout's certificate cannot claim other's IP (ipBlocks and the app's
    view of the caller would both be fooled)."""
    node_a, node_b = await mesh.start_pair()
    with pytest.raises(ConnectRefused) as info:
        await open_tunnel(node_a, node_b, app.port, forwarded=(OTHER_IP, 1))
    assert info.value.status == 401
    assert app.peers == []


async def test_authority_must_be_the_dialled_pod(mesh: Mesh, app: App) -> None:
    node_a, node_b = await mesh.start_pair()
    cert = await node_a.certs.fetch(CHECKOUT, timeout=10)
    with pytest.raises(ConnectRefused) as info:
        await node_a.pool.open_stream(
            cert,
            PAYMENTS_IP,
            node_b.address("hbone")[1],
            PAYMENTS,
            (OTHER_IP, app.port),
            forwarded_for=(CHECKOUT_IP, 1),
        )
    assert info.value.status == 400


async def test_policy_change_closes_live_connection(
    mesh: Mesh, app: App, access_log: AccessLog
) -> None:
    node_a, node_b = await mesh.start_pair()
    t = await open_tunnel(node_a, node_b, app.port)
    await t.reader.readline()
    t.writer.write(b"before")
    assert await t.reader.readexactly(6) == b"before"

    doc = default_doc()
    doc["authorizationPolicies"][0]["spec"]["rules"][0]["from"][0]["source"]["principals"] = [  # type: ignore[index]
        "cluster.local/ns/shop/sa/nobody"
    ]
    mesh.controller.write_registry(doc)  # type: ignore[arg-type]

    async def closed() -> bytes:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            while True:
                data = await t.reader.read(1024)
                if not data:
                    raise asyncio.IncompleteReadError(b"", None)
        return b""

    await asyncio.wait_for(closed(), 10)
    t.writer.close()
    entries = [json.loads(line) for line in access_log.lines]
    rechecked = [e for e in entries if e["direction"] == "inbound" and e["verdict"] == "deny"]
    assert rechecked and rechecked[-1]["response_flags"] == "RBAC"
    assert "policy re-check" in rechecked[-1]["reason"]
    assert len(node_b.connections) == 0


async def test_plaintext_refused_when_strict_or_unauthenticated(
    mesh: Mesh, app: App, access_log: AccessLog
) -> None:
    """STRICT refuses plaintext; PERMISSIVE lets it reach authorization, where a
    policy that names principals cannot match a caller without one."""
    _, node_b = await mesh.start_pair()
    # The node's steering would deliver LEGACY_IP -> PAYMENTS_IP:port here; on
    # loopback the listener's own address stands for the original destination.
    host, port = node_b.address("inbound_plaintext")

    async def refused() -> dict[str, object]:
        before = len(access_log.lines)
        r, w = await asyncio.open_connection(host, port, local_addr=(LEGACY_IP, 0))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        w.close()
        assert len(access_log.lines) == before + 1
        entry: dict[str, object] = json.loads(access_log.lines[-1])
        return entry

    strict = await refused()
    assert strict["verdict"] == "deny" and strict["response_flags"] == "RBAC"
    assert "STRICT" in str(strict["reason"])

    doc = default_doc()
    doc["peerAuthentications"] = [
        {"name": "default", "namespace": "shop", "spec": {"mtls": {"mode": "PERMISSIVE"}}}
    ]
    mesh.controller.write_registry(doc)  # type: ignore[arg-type]
    for _ in range(100):
        pa = node_b.store.current.peer_authentications.get("shop/default")
        if pa is not None and pa.mode.value == "PERMISSIVE":
            break
        await asyncio.sleep(0.1)
    unauthenticated = await refused()
    assert unauthenticated["response_flags"] == "RBAC"
    assert unauthenticated["policy"] is None  # no ALLOW policy matched
    assert "ALLOW" in str(unauthenticated["reason"])

    # With no policy left, the port-loop guard is what refuses a connection
    # addressed to the ztunnel's own port (on a node, pods are elsewhere).
    doc["authorizationPolicies"] = []
    mesh.controller.write_registry(doc)  # type: ignore[arg-type]
    for _ in range(100):
        if not node_b.store.current.policies:
            break
        await asyncio.sleep(0.1)
    guarded = await refused()
    assert guarded["response_flags"] == "NR"
    assert app.peers == []
