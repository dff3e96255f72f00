"""The waypoint path with real parts: controller, agents (eBPF steering), ztunnels
and the waypoint in its own pod, built from ``examples/registry.yaml`` like the demo.

checkout's connection to the payments-api VIP is captured by the agent's eBPF
programs, routed by checkout's ztunnel to the waypoint (``ViaWaypoint``), and
forwarded by the waypoint over HBONE to payments' node. Checked: L7 policy by
source identity, method, path (normalised) and JWT claims; that refused
requests never reach the app; and that the path fails closed when the waypoint
is not ready or not running.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab.apps import http_request
from lab.demo import DEFAULT_REGISTRY
from lab.demo_waypoint import L7Demo
from lab.mesh import LabMesh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def l7() -> Iterator[L7Demo]:
    with LabMesh(DEFAULT_REGISTRY) as mesh:
        demo = L7Demo.prepare(mesh)
        assert demo is not None, "examples/registry.yaml declares no waypoint"

        def deny_internal(doc: dict[str, Any]) -> None:
            doc["authorizationPolicies"].append(
                {
                    "name": "deny-internal",
                    "namespace": "shop",
                    "spec": {
                        "targetRefs": [{"kind": "Gateway", "name": "shop-waypoint"}],
                        "action": "DENY",
                        "rules": [{"to": [{"operation": {"paths": ["/internal*"]}}]}],
                    },
                }
            )

        mesh.update_registry(deny_internal)
        mesh.start()
        demo.start()
        yield demo


def from_pod(
    l7: L7Demo, pod: str, method: str, path: str, token: str | None = None, vip: str = ""
) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with l7.mesh.in_pod(pod):
        sock = socket.create_connection((vip or l7.service_vip, l7.service_port), timeout=5.0)
    with sock:
        sock.settimeout(10.0)
        return http_request(sock, method, path, headers)[0]


def test_policies_and_tokens_through_the_waypoint(l7: L7Demo) -> None:
    before = len(l7.seen())
    assert from_pod(l7, "checkout", "GET", "/pay") == 200
    assert from_pod(l7, "checkout", "GET", "/pay/123") == 200
    assert from_pod(l7, "checkout", "DELETE", "/pay") == 403
    # Another identity: the ALLOW rule names checkout's principal.
    assert from_pod(l7, "other", "GET", "/pay") == 403
    admin = l7.token(role="admin")
    assert from_pod(l7, "other", "POST", "/admin", admin) == 200
    assert from_pod(l7, "checkout", "POST", "/admin", l7.token(role="viewer")) == 403
    assert from_pod(l7, "checkout", "POST", "/admin") == 403
    expired = l7.token(role="admin", exp=int(time.time()) - 3600)
    assert from_pod(l7, "checkout", "POST", "/admin", expired) == 401
    assert from_pod(l7, "checkout", "POST", "/admin", l7.token(l7.forger, role="admin")) == 401
    seen = [(s["method"], s["path"]) for s in l7.seen()[before:]]
    assert seen == [("GET", "/pay"), ("GET", "/pay/123"), ("POST", "/admin")]


def test_ipv6_vip_goes_through_the_waypoint_too(l7: L7Demo) -> None:
    (vip6,) = [
        v
        for s in l7.mesh.document["services"]
        if s["name"] == "payments-api"
        for v in s["vips"]
        if ":" in v
    ]
    before = len(l7.seen())
    assert from_pod(l7, "checkout", "GET", "/pay", vip=vip6) == 200
    assert from_pod(l7, "checkout", "DELETE", "/pay", vip=vip6) == 403
    assert [(s["method"], s["path"]) for s in l7.seen()[before:]] == [("GET", "/pay")]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/internal", 403),
        ("/./internal", 403),
        ("//internal", 403),
        ("/%69nternal", 403),
        ("/x/../internal/a", 403),
        ("/internal/..;/", 400),
        ("/%2Finternal", 400),
    ],
)
def test_path_normalisation_against_a_deny(l7: L7Demo, path: str, status: int) -> None:
    before = len(l7.seen())
    assert from_pod(l7, "checkout", "GET", path) == status
    assert l7.seen()[before:] == []


def test_source_ztunnel_routes_through_the_waypoint(l7: L7Demo) -> None:
    # A connection held open shows in node-a's ztunnel with the waypoint route.
    with l7.mesh.in_pod("checkout"):
        sock = socket.create_connection((l7.service_vip, l7.service_port), timeout=5.0)
    with sock:
        deadline = time.monotonic() + 5
        conns: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            conns = [
                c
                for c in l7.mesh.config_dump("node-a").get("connections", [])
                if str(c.get("dst", "")).startswith(l7.service_vip)
            ]
            if conns:
                break
            time.sleep(0.1)
    assert conns, "checkout's ztunnel shows no connection to the payments-api VIP"
    assert conns[0]["route"] == "waypoint"
    # Under checkout's identity, to the waypoint's.
    assert conns[0]["src_identity"] == "spiffe://cluster.local/ns/shop/sa/checkout"
    assert conns[0]["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/shop-waypoint"


def test_fails_closed_without_a_ready_waypoint(l7: L7Demo) -> None:
    def readiness(ready: bool) -> None:
        def mutate(doc: dict[str, Any]) -> None:
            for w in doc["workloads"]:
                if w["name"] == l7.pod:
                    w["ready"] = ready

        l7.mesh.update_registry(mutate)

    def refused() -> bool:
        try:
            from_pod(l7, "checkout", "GET", "/pay")
        except (OSError, ConnectionError):
            return True
        return False

    readiness(False)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not refused():
            time.sleep(0.3)
        assert refused(), "with no ready replica the VIP must be refused, never bypassed"
        # The pod IP of payments' HTTP port is not behind the waypoint (only the
        # Service opted in): direct traffic keeps today's path and L4 policy.
        payments = l7.mesh.pod("payments")
        with l7.mesh.in_pod("checkout"):
            sock = socket.create_connection((payments.ip, 8081), timeout=5.0)
        with sock:
            assert http_request(sock, "GET", "/direct")[0] == 200
    finally:
        readiness(True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and refused():
        time.sleep(0.3)
    assert from_pod(l7, "checkout", "GET", "/pay") == 200
