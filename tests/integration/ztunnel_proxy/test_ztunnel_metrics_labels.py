"""The Istio labels and the new ztunnel metrics, scraped from /metrics after real traffic.

Two in-process ztunnels and a real controller on loopback. A Service VIP is a
loopback address too (127.0.96.20): a listener there accepts the client's
connection and hands it to node-a's outbound path, which is what the node's
steering does for a captured SYN (see tests/netns/ztunnel for the capture).
checkout -> VIP is allowed; other -> VIP is denied at node-b by a DENY policy.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.controller import ControllerProcess
from tests.support.loopback_mesh import (
    CHECKOUT_IP,
    OTHER_IP,
    PAYMENTS_IP,
    App,
    Mesh,
    default_doc,
    node_config,
)
from ztunnel.app import Ztunnel

VIP = "127.0.96.20"
SERVICE_HOST = "payments.shop.svc.cluster.local"


async def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def has_state(zt: Ztunnel) -> bool:
    snap = zt.store.current
    return snap.is_vip(VIP) and "shop/deny-other" in snap.policies


async def scrape(zt: Ztunnel) -> str:
    host, port = zt.ops.addresses["metrics"]
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{host}:{port}/metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]


async def through_vip(zt: Ztunnel, client_ip: str, vip_port: int, lst: socket.socket) -> bytes:
    """Connects client_ip -> VIP, hands the accepted socket to zt's outbound
    path, sends a line; returns what came back before EOF or reset."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.bind((client_ip, 0))
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, (VIP, vip_port))
    accepted, _ = await loop.sock_accept(lst)
    accepted.setblocking(False)
    coro = zt.outbound.handle(accepted)
    task = asyncio.create_task(coro) if coro is not None else None
    reader, writer = await asyncio.open_connection(sock=client)
    got = b""
    try:
        writer.write(b"hello\n")
        await writer.drain()
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        pass
    finally:
        writer.close()
    if task is not None:
        await asyncio.wait_for(task, 10)
    return got


async def test_istio_labels_and_denies_after_vip_traffic(
    controller: ControllerProcess, mesh: Mesh, app: App, tmp_path: Path
) -> None:
    lst = socket.create_server((VIP, 0))
    lst.setblocking(False)
    vip_port = lst.getsockname()[1]
    doc = default_doc()
    for w in doc["workloads"]:
        if w["name"] == "payments":
            w["labels"].update({"app.kubernetes.io/version": "v2"})
    doc["services"] = [
        {
            "name": "payments",
            "namespace": "shop",
            "vips": [VIP],
            "ports": [{"name": "tcp", "port": vip_port, "targetPort": app.port}],
            "selector": {"app": "payments"},
        }
    ]
    doc["authorizationPolicies"].append(
        {
            "name": "deny-other",
            "namespace": "shop",
            "spec": {
                "selector": {"matchLabels": {"app": "payments"}},
                "action": "DENY",
                "rules": [
                    {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/other"]}}]}
                ],
            },
        }
    )
    controller.write_registry(doc)
    try:
        node_b = await mesh.start_node("node-b", PAYMENTS_IP)
        state = tmp_path / "node-a-state"
        await controller.join("node-a", state)
        node_a = Ztunnel(
            node_config("node-a", state, CHECKOUT_IP),
            peer_hbone_port=node_b.address("hbone")[1],
        )
        mesh.nodes["node-a"] = node_a
        await node_a.start(sync_timeout=15)
        for zt in (node_a, node_b):
            await until(partial(has_state, zt), "the VIP and the DENY policy in the state")

        allowed = await through_vip(node_a, CHECKOUT_IP, vip_port, lst)
        assert allowed.startswith(b"peer ") and allowed.endswith(b"hello\n")
        denied = await through_vip(node_a, OTHER_IP, vip_port, lst)
        assert denied == b""
        await until(lambda: not node_b.connections.dump(), "node-b's connections to end")
    finally:
        lst.close()

    text_a, text_b = await scrape(node_a), await scrape(node_b)
    service = {
        "destination_service": SERVICE_HOST,
        "destination_service_name": "payments",
        "destination_service_namespace": "shop",
        "request_protocol": "tcp",
        "connection_security_policy": "mutual_tls",
        "destination_app": "payments",
        "destination_canonical_service": "payments",
        "destination_canonical_revision": "v2",
    }
    # The source side: the VIP the client dialled names the service.
    ok = samples(
        text_a,
        "istio_tcp_connections_closed_total",
        reporter="source",
        source_workload="checkout",
        source_app="checkout",
        source_canonical_revision="latest",
        response_flags="-",
        **service,
    )
    assert [v for _, v in ok] == [1.0], text_a
    sent = samples(
        text_a, "istio_tcp_sent_bytes_total", reporter="source", source_workload="checkout"
    )
    assert sent and sent[0][1] >= len(b"hello\n")
    refused = samples(
        text_a,
        "istio_tcp_connections_closed_total",
        reporter="source",
        source_workload="other",
        response_flags="RBAC",
        **service,
    )
    assert [v for _, v in refused] == [1.0], text_a
    # The destination side: the only Service selecting payments is guessed.
    inbound = samples(
        text_b,
        "istio_tcp_connections_closed_total",
        reporter="destination",
        source_workload="checkout",
        source_principal="spiffe://cluster.local/ns/shop/sa/checkout",
        destination_principal="spiffe://cluster.local/ns/shop/sa/payments",
        **service,
    )
    assert [v for _, v in inbound] == [1.0], text_b
    # The deny is counted once, by the ztunnel that decided it.
    deny = samples(
        text_b,
        "veil_ztunnel_policy_denies_total",
        policy="shop/deny-other",
        reason="deny_policy",
    )
    assert [v for _, v in deny] == [1.0], text_b
    assert sum(v for _, v in samples(text_a, "veil_ztunnel_policy_denies_total")) == 0.0

    # The other new families.
    expiry = samples(text_a, "veil_ztunnel_certificate_expiry_timestamp_seconds")
    identities = {labels["identity"] for labels, _ in expiry}
    assert "spiffe://cluster.local/ns/shop/sa/checkout" in identities
    assert all(v > time.time() for _, v in expiry)
    assert samples(text_a, "veil_ztunnel_hbone_pool_connections", state="open")[0][1] >= 1.0
    assert samples(text_a, "veil_ztunnel_hbone_pool_streams")[0][1] == 0.0
    assert samples(text_a, "veil_ztunnel_controller_reconnects_total")[0][1] == 0.0
    assert samples(text_a, "veil_ztunnel_controller_reachable")[0][1] == 1.0
    build = samples(text_a, "veil_build_info")
    assert len(build) == 1 and set(build[0][0]) == {"version", "python"}
    assert samples(text_a, "process_resident_memory_bytes")[0][1] > 0
