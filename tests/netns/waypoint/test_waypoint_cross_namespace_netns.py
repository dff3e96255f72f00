"""A waypoint in another namespace, with real parts (controller, agents with eBPF
steering, ztunnels, the waypoint in its own pod), built from
``examples/registry.yaml`` rearranged into three namespaces:

* ``front``: the client, checkout;
* ``shop``: payments and the Service payments-api, labelled
  ``veil.io/use-waypoint: shop-waypoint`` and
  ``veil.io/use-waypoint-namespace: mesh-gw``;
* ``mesh-gw``: the waypoint replica shop-waypoint-0.

checkout's connection to the payments-api VIP goes to the waypoint in
``mesh-gw`` (under checkout's identity, expecting the waypoint's), and the L7
AuthorizationPolicy attached to the Service in ``shop`` decides per request.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.apps import http_request
from lab.demo import DEFAULT_REGISTRY
from lab.demo_waypoint import L7_APP_PORT
from lab.mesh import LabMesh

pytestmark = pytest.mark.slow

TD = "cluster.local"
VIP, PORT = "10.96.0.21", 80
CHECKOUT = f"{TD}/ns/front/sa/checkout"
WAYPOINT = f"{TD}/ns/mesh-gw/sa/shop-waypoint"


def _rearrange(doc: dict[str, Any]) -> None:
    doc["namespaces"] += [
        {"name": "front", "labels": {"veil.io/dataplane-mode": "ambient"}},
        {"name": "mesh-gw"},
    ]
    for w in doc["workloads"]:
        if w["name"] == "checkout":
            w["namespace"] = "front"
        if w["name"] == "shop-waypoint-0":
            w["namespace"] = "mesh-gw"
    for s in doc["services"]:
        if s["name"] == "payments-api":
            s["labels"] = {
                "veil.io/use-waypoint": "shop-waypoint",
                "veil.io/use-waypoint-namespace": "mesh-gw",
            }
    for p in doc["authorizationPolicies"]:
        if p["name"] == "payments-allow-checkout":
            p["spec"]["rules"] = [
                {"from": [{"source": {"principals": [CHECKOUT]}}]},
                {
                    "from": [{"source": {"principals": [WAYPOINT]}}],
                    "to": [{"operation": {"ports": [L7_APP_PORT]}}],
                },
            ]
        if p["name"] == "payments-api-l7":
            p["spec"]["rules"] = [
                {
                    "from": [{"source": {"principals": [CHECKOUT]}}],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/pay", "/pay/*"]}}],
                }
            ]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabMesh]:
    doc = yaml.safe_load(Path(DEFAULT_REGISTRY).read_text())
    _rearrange(doc)
    registry = tmp_path_factory.mktemp("xns") / "registry.yaml"
    registry.write_text(yaml.safe_dump(doc))
    with LabMesh(registry) as lab:
        lab.start()
        payments = lab.pod("payments")
        lab.topo.start_app(
            payments.lab, "http", L7_APP_PORT, log_path=lab.workdir / "logs" / "payments-http.log"
        )
        lab.start_waypoint("shop-waypoint-0")
        yield lab


def from_pod(mesh: LabMesh, pod: str, method: str, path: str) -> tuple[int, bytes]:
    with mesh.in_pod(pod):
        sock = socket.create_connection((VIP, PORT), timeout=5.0)
    with sock:
        sock.settimeout(10.0)
        return http_request(sock, method, path, {})


def test_l7_policy_applies_through_a_waypoint_in_another_namespace(mesh: LabMesh) -> None:
    assert from_pod(mesh, "checkout", "GET", "/pay")[0] == 200
    # The waypoint's answers, by method and by source identity.
    assert from_pod(mesh, "checkout", "DELETE", "/pay") == (403, b"RBAC: access denied")
    assert from_pod(mesh, "other", "GET", "/pay") == (403, b"RBAC: access denied")


def test_the_source_ztunnel_tunnels_to_the_waypoints_identity(mesh: LabMesh) -> None:
    with mesh.in_pod("checkout"):
        sock = socket.create_connection((VIP, PORT), timeout=5.0)
    with sock:
        deadline = time.monotonic() + 5
        conns: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            conns = [
                c
                for c in mesh.config_dump("node-a").get("connections", [])
                if str(c.get("dst", "")).startswith(VIP)
            ]
            if conns:
                break
            time.sleep(0.1)
    assert conns, "checkout's ztunnel shows no connection to the payments-api VIP"
    assert conns[0]["route"] == "waypoint"
    assert conns[0]["src_identity"] == f"spiffe://{CHECKOUT}"
    assert conns[0]["dst_identity"] == f"spiffe://{WAYPOINT}"
