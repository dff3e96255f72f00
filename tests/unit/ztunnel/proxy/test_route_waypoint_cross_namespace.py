"""route() and Snapshot.waypoint_of() for waypoints in another namespace
(``veil.io/use-waypoint-namespace``); table tests, no sockets."""

from __future__ import annotations

import pytest

from controller.api.model import (
    AMBIENT,
    DATAPLANE_MODE_LABEL,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_LABEL,
    Labels,
    Namespace,
    Service,
    ServicePort,
    Workload,
)
from controller.api.spiffe import workload_identity
from node.dataplane import HBONE_PORT
from node.state import Snapshot, build_snapshot
from ztunnel.proxy.route import REFUSE_NO_WAYPOINT, Hbone, Refuse, ViaWaypoint, route

NODE = "node-a"


def wl(name: str, ns: str, node: str, ip: str, sa: str = "", **labels: str) -> Workload:
    return Workload(
        name, ns, sa or name, node, (ip,), Labels({"app": name, **labels}), enrolled=True
    )


def svc(name: str, ns: str, vip: str, ep: str, wp: str = "", wp_ns: str = "") -> Service:
    return Service(
        name, ns, (vip,), (ServicePort(80, 8080),), endpoints=(f"{ns}/{ep}",),
        use_waypoint=wp, use_waypoint_namespace=wp_ns,
    )  # fmt: skip


def ns(name: str, **labels: str) -> Namespace:
    return Namespace(name, Labels({DATAPLANE_MODE_LABEL: AMBIENT, **labels}))


WP = {WAYPOINT_LABEL: "mesh-wp"}
RESOURCES = [
    ns("client-ns"),
    # Every workload of "orders" goes through mesh/mesh-wp.
    ns("orders", **{USE_WAYPOINT_LABEL: "mesh-wp", USE_WAYPOINT_NAMESPACE_LABEL: "mesh"}),
    ns("bank"),
    ns("mesh"),
    # Names a waypoint in its own namespace by default; none runs there.
    ns("local", **{USE_WAYPOINT_LABEL: "mesh-wp"}),
    wl("client", "client-ns", NODE, "10.0.1.10"),
    wl("orders-1", "orders", "node-b", "10.0.2.10"),
    wl("vault-1", "bank", "node-b", "10.0.3.10"),
    wl("ledger-1", "bank", "node-b", "10.0.3.20"),
    wl("local-1", "local", "node-b", "10.0.5.10"),
    wl("mesh-wp-0", "mesh", "node-w", "10.0.9.10", sa="mesh-wp", **WP),
    svc("orders", "orders", "10.96.2.10", "orders-1"),
    # The Service's own label pair wins over its namespace's.
    svc("vault", "bank", "10.96.3.10", "vault-1", "mesh-wp", "mesh"),
    # use-waypoint-namespace without use-waypoint means nothing (as in Istio).
    svc("ledger", "bank", "10.96.3.20", "ledger-1", "", "mesh"),
    # Names mesh-wp but in its own namespace, where none runs.
    svc("other", "orders", "10.96.2.20", "orders-1", "mesh-wp"),
]
MESH_WP = workload_identity("cluster.local", "mesh", "mesh-wp")


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return build_snapshot(NODE, RESOURCES, epoch="e", version=1, trust_bundle=None)


@pytest.mark.parametrize(
    ("namespace", "service", "expected"),
    [
        ("orders", None, ("mesh", "mesh-wp")),
        ("orders", "orders/orders", ("mesh", "mesh-wp")),
        ("orders", "orders/other", ("orders", "mesh-wp")),
        ("bank", "bank/vault", ("mesh", "mesh-wp")),
        ("bank", "bank/ledger", None),
        ("bank", None, None),
        ("local", None, ("local", "mesh-wp")),
        ("unknown", None, None),
    ],
)
def test_waypoint_of(
    snap: Snapshot, namespace: str, service: str | None, expected: tuple[str, str] | None
) -> None:
    s = snap.services[service] if service else None
    assert snap.waypoint_of(namespace, s) == expected


@pytest.mark.parametrize(
    ("dst", "port"),
    [
        ("10.96.2.10", 80),  # Service in a namespace labelled for mesh/mesh-wp
        ("10.0.2.10", 8080),  # a workload IP in that namespace
        ("10.96.3.10", 80),  # a Service labelled for mesh/mesh-wp itself
    ],
)
def test_to_a_waypoint_in_another_namespace(snap: Snapshot, dst: str, port: int) -> None:
    r = route(snap, "10.0.1.10", dst, port)
    assert isinstance(r, ViaWaypoint), r
    assert r.hbone_addr == ("10.0.9.10", HBONE_PORT)
    assert r.expected_identity == MESH_WP
    assert (r.dst_ip, r.dst_port) == (dst, port)
    assert r.source.key == "client-ns/client"


def test_use_waypoint_namespace_alone_keeps_the_direct_path(snap: Snapshot) -> None:
    r = route(snap, "10.0.1.10", "10.96.3.20", 80)
    assert isinstance(r, Hbone), r
    assert (r.dst_ip, r.dst_port) == ("10.0.3.20", 8080)


def test_the_default_namespace_is_the_labelled_objects_own(snap: Snapshot) -> None:
    # mesh-wp runs in "mesh", not in "local" or "orders": refused, never bypassed.
    for dst, port, where in (
        ("10.0.5.10", 8080, "local/mesh-wp"),
        ("10.96.2.20", 80, "orders/mesh-wp"),
    ):
        r = route(snap, "10.0.1.10", dst, port)
        assert isinstance(r, Refuse), r
        assert r.reason.startswith(f"{REFUSE_NO_WAYPOINT} {where}"), r.reason


def test_the_waypoints_own_upstream_connections_are_not_looped() -> None:
    wsnap = build_snapshot("node-w", RESOURCES, epoch="e", version=1, trust_bundle=None)
    r = route(wsnap, "10.0.9.10", "10.96.3.10", 80)
    assert isinstance(r, Hbone), r
    assert (r.dst_ip, r.dst_port) == ("10.0.3.10", 8080)
    r = route(wsnap, "10.0.9.10", "10.0.2.10", 8080)
    assert isinstance(r, Hbone), r
