"""The ztunnel's decision core and operations against a real controller process.

A node joins with a real token; the ztunnel pieces (state store, Discovery
watch, CertManager, admin/metrics/readiness servers) run in this process over
the node's mTLS credentials, loaded from the state dir with
node.load_node_credentials as the ztunnel does. The controller is
stopped and started again to check that the node keeps serving the last state
and certificates and then reconnects.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from controller.api.client import ControllerClient
from controller.api.spiffe import SpiffeId
from node import NodeCredentials, join, load_node_credentials
from node.policy import Connection, authorize, plaintext_verdict
from node.state import StateStore
from node.watch import Backoff, WatchClient
from ztunnel.admin import OpsServer, Readiness, register_state_gauges
from ztunnel.errors import AdminBindError
from ztunnel.identity import CertManager
from ztunnel.metrics import ConnectionLabels, ConnectionReport, Registry, Reporter, TrafficMetrics
from ztunnel.proxy.route import Hbone, route

from .conftest import ControllerProcess, example_doc

NODE = "node-a"
CHECKOUT = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/checkout")
OTHER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/other")
CART = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
PAYMENTS = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/payments")


async def until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@dataclass
class Core:
    creds: NodeCredentials
    client: ControllerClient
    store: StateStore
    certs: CertManager
    watch: WatchClient
    traffic: TrafficMetrics
    ops: OpsServer
    http: aiohttp.ClientSession
    connections: list[dict[str, object]]

    def url(self, listener: str, path: str) -> str:
        host, port = self.ops.addresses[listener]
        return f"http://{host}:{port}{path}"

    async def get(self, listener: str, path: str) -> tuple[int, str]:
        async with self.http.get(self.url(listener, path)) as resp:
            return resp.status, await resp.text()


@pytest.fixture
async def core(controller: ControllerProcess, tmp_path: Path) -> AsyncIterator[Core]:
    node_dir = tmp_path / "node"
    token = controller.token(NODE)
    await join(controller.join_addr, token, NODE, node_dir, mtls_address=controller.mtls)
    creds = load_node_credentials(node_dir)  # what the ztunnel does at startup
    client = creds.client()
    store = StateStore(NODE, creds.trust_domain)
    certs = CertManager(
        client,
        lambda: store.current.trust_bundle or creds.trust_bundle(),
        retry_initial=0.2,
        retry_max=1.0,
    )
    store.subscribe(certs.on_state_change)
    watch = WatchClient(client, store, backoff=Backoff(0.1, 0.5))
    registry = Registry()
    traffic = TrafficMetrics(registry)
    register_state_gauges(registry, store, certs, watch.status)
    readiness = Readiness(store, certs)
    connections: list[dict[str, object]] = []
    ops = OpsServer(
        store=store, registry=registry, readiness=readiness, certs=certs,
        watch_status=watch.status, connections=lambda: connections,
        admin_address=("127.0.0.1", 0), metrics_address=("127.0.0.1", 0),
        readiness_address=("127.0.0.1", 0),
    )  # fmt: skip
    await ops.start()
    task = asyncio.create_task(watch.run())
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        yield Core(creds, client, store, certs, watch, traffic, ops, http, connections)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await http.close()
        await ops.stop()
        await certs.close()
        await client.close()


def san(chain_pem: tuple[bytes, ...]) -> list[str]:
    leaf = x509.load_pem_x509_certificate(chain_pem[0])
    ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(ext.get_values_for_type(x509.UniformResourceIdentifier))


async def test_state_certificates_rotation_outage_and_operations(
    controller: ControllerProcess, core: Core
) -> None:
    # --- readiness: first snapshot plus a certificate for every local workload.
    status, body = await core.get("readiness", "/healthz/ready")
    if status != 200:
        assert status == 503 and "not ready" in body
    await until(lambda: core.store.current.synced, "first snapshot")
    snap = core.store.current
    assert snap.local_identities() == {CHECKOUT, OTHER}
    assert snap.trust_bundle is not None and snap.trust_bundle.roots == core.creds.trust_bundle_pem
    await until(lambda: core.certs.has_all(snap.local_identities()), "prefetched certificates")
    status, body = await core.get("readiness", "/healthz/ready")
    assert (status, body) == (200, "ready\n")

    # --- decisions on the watched state.
    r = route(core.store.current, "10.244.1.10", "10.96.0.20", 8080)
    assert isinstance(r, Hbone)
    assert (r.dst_ip, r.dst_port, r.hbone_addr) == ("10.244.2.10", 8080, ("10.244.2.10", 15008))
    assert r.expected_identity == PAYMENTS
    snap = core.store.current
    assert authorize(Connection("10.244.1.10", "10.244.2.10", 8080, CHECKOUT), snap).allowed
    denied = authorize(Connection("10.244.1.11", "10.244.2.10", 8080, OTHER), snap)
    assert not denied.allowed and denied.reason == "no ALLOW policy matched"
    payments = snap.workload_by_ip("10.244.2.10")
    assert payments is not None and not plaintext_verdict(snap, payments).allowed  # STRICT

    # --- certificates: exact SAN, chained to the bundle, rotated at half-life (6 s TTL).
    first = core.certs.get(CHECKOUT)
    assert first is not None and san(first.chain_pem) == [str(CHECKOUT)]
    lifetime = (first.not_after - first.received_at).total_seconds()  # type: ignore[operator]
    assert 4 < lifetime <= 6.5
    await until(
        lambda: (c := core.certs.get(CHECKOUT)) is not None and c.serial != first.serial,
        "rotation",
        timeout=10,
    )
    rotated = core.certs.get(CHECKOUT)
    assert rotated is not None and rotated.key_pem != first.key_pem

    # --- a new workload on this node: the watch delivers it, the cert is prefetched.
    doc = example_doc()
    doc["workloads"].append(
        {
            "name": "cart",
            "namespace": "shop",
            "serviceAccount": "cart",
            "node": NODE,
            "ips": ["10.244.1.20"],
        }
    )
    controller.write_registry(doc)
    await until(lambda: core.certs.get(CART) is not None, "certificate for the new workload")
    assert core.store.current.local_workload_by_ip("10.244.1.20") is not None

    # --- metrics, access log provider, config dump.
    checkout = core.store.current.workload_by_ip("10.244.1.10")
    labels = ConnectionLabels.of(Reporter.SOURCE, checkout, CHECKOUT, payments, PAYMENTS)
    core.traffic.connection_opened(labels)
    core.traffic.connection_closed(ConnectionReport(
        Reporter.SOURCE, ("10.244.1.10", 41000), ("10.244.2.10", 8080), checkout, payments,
        CHECKOUT, PAYMENTS, received_bytes=11, sent_bytes=22, duration=0.5,
    ))  # fmt: skip
    core.connections.append({"src": "10.244.1.10:41000", "dst": "10.244.2.10:8080"})
    status, text = await core.get("metrics", "/metrics")
    assert status == 200
    opened = [
        ln for ln in text.splitlines() if ln.startswith("istio_tcp_connections_opened_total{")
    ]
    assert any('reporter="source"' in ln and 'source_workload="checkout"' in ln for ln in opened)
    sent = [ln for ln in text.splitlines() if ln.startswith("istio_tcp_sent_bytes_total{")]
    assert any('reporter="source"' in ln and ln.endswith("} 22.0") for ln in sent)
    assert "veil_ztunnel_controller_connected 1.0\n" in text
    assert 'veil_ztunnel_certificates{state="valid"} 3.0\n' in text
    status, text = await core.get("admin", "/config_dump")
    assert status == 200
    dump = json.loads(text)
    assert dump["node"] == NODE and dump["controller"]["connected"] is True
    assert {c["identity"] for c in dump["certificates"]} == {str(CHECKOUT), str(OTHER), str(CART)}
    assert "PRIVATE KEY" not in text
    assert dump["connections"] == core.connections
    assert any(p["key"] == "shop/payments-allow-checkout" for p in dump["policies"])
    assert (await core.get("admin", "/healthz")) == (200, "ok\n")
    status, _ = await core.get("metrics", "/config_dump")
    assert status == 404  # state is only on the loopback admin listener

    # --- outage: the node keeps serving its state and certificates, then reconnects.
    version_before = core.store.current.version
    controller.stop()
    await until(lambda: not core.watch.status().connected, "watch to notice the outage")
    held = core.certs.get(CHECKOUT)
    assert held is not None
    assert isinstance(route(core.store.current, "10.244.1.10", "10.96.0.20", 8080), Hbone)
    assert core.store.current.version == version_before
    # A rotation attempt fails; the held certificate stays in use until it expires.
    await until(
        lambda: any(s.last_error for s in core.certs.statuses()), "a failed renewal", timeout=8
    )
    status, text = await core.get("metrics", "/metrics")
    assert "veil_ztunnel_controller_connected 0.0\n" in text
    controller.start()
    await until(lambda: core.watch.status().connected, "reconnect", timeout=20)
    await until(
        lambda: all(s.state == "valid" and s.last_error is None for s in core.certs.statuses()),
        "renewals after the outage",
        timeout=20,
    )
    assert core.watch.status().reconnects >= 1
    assert core.store.current.local_identities() == {CHECKOUT, OTHER, CART}
    status, _ = await core.get("readiness", "/healthz/ready")
    assert status == 200


async def test_admin_refuses_a_non_loopback_bind() -> None:
    store = StateStore(NODE)
    with pytest.raises(AdminBindError, match="not a loopback address") as exc:
        OpsServer(
            store=store,
            registry=Registry(),
            readiness=Readiness(store, None),
            admin_address=("0.0.0.0", 0),
        )
    assert exc.value.hint and "127.0.0.1" in exc.value.hint


async def test_busy_port_is_reported_and_nothing_stays_bound() -> None:
    store = StateStore(NODE)
    # Held by another program (no SO_REUSEPORT); a second ztunnel would share it
    # on purpose (the rolling-update surge).
    first = socket.create_server(("127.0.0.1", 0))
    try:
        taken = first.getsockname()[1]
        second = OpsServer(
            store=store,
            registry=Registry(),
            readiness=Readiness(store, None),
            admin_address=("127.0.0.1", 0),
            metrics_address=("127.0.0.1", taken),
            readiness_address=None,
        )
        with pytest.raises(AdminBindError, match="cannot listen for metrics"):
            await second.start()
        assert second.addresses == {}
    finally:
        first.close()
