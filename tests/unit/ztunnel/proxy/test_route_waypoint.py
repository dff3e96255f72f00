"""route() for destinations that opted into a waypoint (table tests, no sockets)."""

from __future__ import annotations

import pytest

from controller.api.model import (
    AMBIENT,
    DATAPLANE_MODE_LABEL,
    USE_WAYPOINT_LABEL,
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
from ztunnel.proxy.route import (
    REFUSE_NO_WAYPOINT,
    Hbone,
    Refuse,
    RoundRobin,
    SameNode,
    ViaWaypoint,
    route,
)

NODE = "node-a"


def wl(
    name: str, ns: str, node: str, *ips: str, sa: str = "", ready: bool = True, **labels: str
) -> Workload:
    return Workload(
        name=name,
        namespace=ns,
        service_account=sa or name,
        node=node,
        ips=ips,
        enrolled=True,
        ready=ready,
        labels=Labels({"app": name, **labels}),
    )


def svc(name: str, ns: str, vip: str, endpoints: list[str], use_waypoint: str = "") -> Service:
    return Service(
        name=name,
        namespace=ns,
        vips=(vip,),
        ports=(ServicePort(80, 8080),),
        endpoints=tuple(f"{ns}/{e}" for e in endpoints),
        use_waypoint=use_waypoint,
    )


def ns(name: str, waypoint: str = "") -> Namespace:
    labels = {DATAPLANE_MODE_LABEL: AMBIENT}
    if waypoint:
        labels[USE_WAYPOINT_LABEL] = waypoint
    return Namespace(name, Labels(labels))


WP = {WAYPOINT_LABEL: "shop-waypoint"}
RESOURCES = [
    ns("shop", "shop-waypoint"),  # the whole namespace uses the waypoint
    ns("bank"),  # only one Service opts in
    ns("empty", "gone"),  # names a waypoint with no replica
    wl("client", "bank", NODE, "10.0.1.10", "fd00::10"),
    wl("payments", "shop", "node-b", "10.0.2.10"),
    wl("local-pay", "shop", NODE, "10.0.1.20"),
    wl("wp-0", "shop", "node-w", "10.0.9.10", "fd00::9:10", sa="shop-waypoint", **WP),
    wl("wp-1", "shop", "node-w2", "10.0.9.11", sa="shop-waypoint", **WP),
    wl("wp-down", "shop", "node-w3", "10.0.9.12", sa="shop-waypoint", ready=False, **WP),
    wl("ledger", "bank", "node-b", "10.0.3.10"),
    wl("vault", "bank", "node-b", "10.0.3.20"),
    wl("bank-wp", "bank", "node-w", "10.0.9.20", sa="bank-wp", **{WAYPOINT_LABEL: "bank-wp"}),
    wl("lonely", "empty", "node-b", "10.0.4.10"),
    svc("payments", "shop", "10.96.0.20", ["payments"]),
    svc("nobody", "shop", "10.96.0.21", []),
    svc("pay6", "shop", "fd00:96::20", ["payments"]),
    svc("ledger", "bank", "10.96.1.10", ["ledger"], use_waypoint="bank-wp"),
    svc("vault", "bank", "10.96.1.20", ["vault"]),
    svc("lonely", "empty", "10.96.4.10", ["lonely"]),
]
# The waypoint's own snapshot: it runs on node-w and is the source.
WP_NODE = "node-w"


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return build_snapshot(NODE, RESOURCES, epoch="e", version=1, trust_bundle=None)


SHOP_WP = workload_identity("cluster.local", "shop", "shop-waypoint")
BANK_WP = workload_identity("cluster.local", "bank", "bank-wp")


@pytest.mark.parametrize(
    ("src", "dst", "port", "via", "identity", "service", "destination"),
    [
        # A VIP of a Service in a namespace that uses a waypoint: to the
        # waypoint, authority = the VIP and the Service port (not the target port).
        ("10.0.1.10", "10.96.0.20", 80, ("10.0.9.10", HBONE_PORT), SHOP_WP, "shop/payments", None),
        # A Service without ready endpoints still goes to the waypoint (it answers 503).
        ("10.0.1.10", "10.96.0.21", 80, ("10.0.9.10", HBONE_PORT), SHOP_WP, "shop/nobody", None),
        # A workload IP in such a namespace: to the waypoint too.
        ("10.0.1.10", "10.0.2.10", 8080, ("10.0.9.10", HBONE_PORT), SHOP_WP, None, "shop/payments"),
        # Even when the destination is on this node: L7 policy lives at the waypoint.
        (
            "10.0.1.10",
            "10.0.1.20",
            8080,
            ("10.0.9.10", HBONE_PORT),
            SHOP_WP,
            None,
            "shop/local-pay",
        ),
        # IPv6 VIP: the replica's IPv6 address (wp-0 is the only dual-stack one).
        ("fd00::10", "fd00:96::20", 80, ("fd00::9:10", HBONE_PORT), SHOP_WP, "shop/pay6", None),
        # A Service label without a namespace label.
        ("10.0.1.10", "10.96.1.10", 80, ("10.0.9.20", HBONE_PORT), BANK_WP, "bank/ledger", None),
    ],
)
def test_to_the_waypoint(
    snap: Snapshot,
    src: str,
    dst: str,
    port: int,
    via: tuple[str, int],
    identity: object,
    service: str | None,
    destination: str | None,
) -> None:
    r = route(snap, src, dst, port)
    assert isinstance(r, ViaWaypoint), r
    assert r.hbone_addr == via
    assert r.expected_identity == identity
    assert (r.dst_ip, r.dst_port) == (dst, port)  # the CONNECT authority
    assert r.source.key == "bank/client"  # tunnelled under the source's identity
    assert (r.service.key if r.service else None) == service
    assert (r.destination.key if r.destination else None) == destination
    assert r.waypoint.waypoint and r.waypoint.ready


@pytest.mark.parametrize(
    ("dst", "port", "kind", "target"),
    [
        # The Service label covers Service traffic only: the pod IP goes direct.
        ("10.0.3.10", 8080, Hbone, ("10.0.3.10", 8080)),
        # A Service in the same namespace without the label: direct, endpoint chosen here.
        ("10.96.1.20", 80, Hbone, ("10.0.3.20", 8080)),
        # A waypoint replica itself is never sent through a waypoint.
        ("10.0.9.10", 15008, Hbone, ("10.0.9.10", 15008)),
    ],
)
def test_direct_path_kept(snap: Snapshot, dst: str, port: int, kind: type, target: object) -> None:
    r = route(snap, "10.0.1.10", dst, port)
    assert isinstance(r, kind), r
    assert isinstance(r, Hbone | SameNode)
    assert (r.dst_ip, r.dst_port) == target


def test_no_ready_replica_refuses_never_bypasses(snap: Snapshot) -> None:
    for dst, port in (("10.96.4.10", 80), ("10.0.4.10", 8080)):
        r = route(snap, "10.0.1.10", dst, port)
        assert isinstance(r, Refuse), r
        assert r.reason.startswith(f"{REFUSE_NO_WAYPOINT} empty/gone")


def test_replicas_are_balanced_and_not_ready_ones_skipped(snap: Snapshot) -> None:
    rr = RoundRobin()
    seen = [route(snap, "10.0.1.10", "10.96.0.20", 80, choose=rr) for _ in range(4)]
    hosts = [r.hbone_addr[0] for r in seen if isinstance(r, ViaWaypoint)]
    assert hosts == ["10.0.9.10", "10.0.9.11", "10.0.9.10", "10.0.9.11"]


def test_the_waypoints_own_connections_go_direct() -> None:
    # In its own snapshot the waypoint is a local workload; were it steered,
    # its upstream connections must not loop back to itself.
    wsnap = build_snapshot(WP_NODE, RESOURCES, epoch="e", version=1, trust_bundle=None)
    r = route(wsnap, "10.0.9.10", "10.96.0.20", 80)
    assert isinstance(r, Hbone), r
    assert (r.dst_ip, r.dst_port) == ("10.0.2.10", 8080)
    assert route(wsnap, "10.0.9.10", "10.0.2.10", 8080).kind == "hbone"


def test_snapshot_indexes_ready_replicas(snap: Snapshot) -> None:
    assert [w.name for w in snap.waypoints[("shop", "shop-waypoint")]] == ["wp-0", "wp-1"]
    assert ("empty", "gone") not in snap.waypoints
