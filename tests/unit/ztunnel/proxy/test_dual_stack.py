"""IPv6 and dual-stack cases of the proxy's pure decisions (issue 9 §2).

route() for v6 destinations, VIPs and node-scoped addresses; decide_inbound()
and decide_plaintext() for v6 clients and authorities; the address helpers the
listeners apply once at accept. No sockets.
"""

from __future__ import annotations

import socket

import pytest

from controller.api.model import (
    AMBIENT,
    DATAPLANE_MODE_LABEL,
    AuthorizationPolicy,
    Labels,
    Namespace,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    Resource,
    Rule,
    Service,
    ServicePort,
    Source,
    Workload,
)
from controller.api.spiffe import SpiffeId, workload_identity
from node.state import Snapshot, build_snapshot
from ztunnel.hbone import ConnectRequest
from ztunnel.proxy.decide import Admit, Reject, decide_inbound, decide_plaintext
from ztunnel.proxy.errors import FLAG_NO_ROUTE, FLAG_POLICY_DENIED
from ztunnel.proxy.route import (
    REFUSE_NODE_SCOPED,
    Hbone,
    Passthrough,
    Refuse,
    SameNode,
    route,
)
from ztunnel.proxy.sockets import Address, family_of, unmap_ip

NODE = "node-a"
CHECKOUT = workload_identity("cluster.local", "shop", "checkout")
INTRUDER = workload_identity("cluster.local", "shop", "intruder")


def wl(name: str, node: str, *ips: str, sa: str | None = None, enrolled: bool = True) -> Workload:
    return Workload(name, "shop", sa or name, node, ips, Labels({"app": name}), enrolled=enrolled)


CHECKOUT_W = wl("checkout", NODE, "10.244.1.10", "fd00:244:1::a")
INTRUDER_W = wl("intruder", NODE, "10.244.1.13", "fd00:244:1::d")
OTHER_W = wl("other", NODE, "10.244.1.11", "fd00:244:1::b")
PAYMENTS_W = wl("payments", "node-b", "10.244.2.10", "fd00:244:2::a")
V4_ONLY_W = wl("a-v4only", "node-b", "10.244.2.20")
V6_ONLY_W = wl("v6only", "node-b", "fd00:244:2::30")
LEGACY_W = wl("legacy", "node-b", "10.244.2.12", "fd00:244:2::c", enrolled=False)


def svc(name: str, vips: tuple[str, ...], *endpoints: str) -> Service:
    return Service(name, "shop", vips, (ServicePort(80, 8081),),
                   endpoints=tuple(f"shop/{e}" for e in endpoints))  # fmt: skip


def allow_checkout(app: str) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        f"{app}-allow-checkout", "shop", PolicyAction.ALLOW,
        (Rule(sources=(Source(principals=("cluster.local/ns/shop/sa/checkout",)),)),),
        Labels({"app": app}),
    )  # fmt: skip


RESOURCES: list[Resource] = [
    Namespace("shop", Labels({DATAPLANE_MODE_LABEL: AMBIENT})),
    CHECKOUT_W, INTRUDER_W, OTHER_W, PAYMENTS_W, V4_ONLY_W, V6_ONLY_W, LEGACY_W,
    svc("payments", ("10.96.0.20", "fd00:96::20"), "payments"),
    svc("mixed", ("fd00:96::21",), "a-v4only", "payments"),
    svc("v4backends", ("fd00:96::22",), "a-v4only"),
    allow_checkout("payments"),
    allow_checkout("other"),
    PeerAuthentication("default", "shop", PeerAuthMode.STRICT),
]  # fmt: skip


def snapshot(node: str) -> Snapshot:
    return build_snapshot(node, RESOURCES, epoch="e", version=1, trust_bundle=None)


@pytest.fixture(scope="module")
def snap_a() -> Snapshot:
    return snapshot(NODE)


@pytest.fixture(scope="module")
def snap_b() -> Snapshot:
    return snapshot("node-b")


# -- route() -------------------------------------------------------------------

ROUTES = [
    # (id, src, dst, port, kind, dst_ip, dst_port, destination key)
    ("v6-to-remote-pod", "fd00:244:1::a", "fd00:244:2::a", 8081, Hbone,
     "fd00:244:2::a", 8081, "shop/payments"),
    ("v6-uppercase-uncompressed", "FD00:244:1:0:0:0:0:A", "FD00:244:2:0::A", 8081, Hbone,
     "fd00:244:2::a", 8081, "shop/payments"),
    ("v6-same-node", "fd00:244:1::a", "fd00:244:1::b", 8080, SameNode,
     "fd00:244:1::b", 8080, "shop/other"),
    ("v6-not-enrolled-passthrough", "fd00:244:1::a", "fd00:244:2::c", 22, Passthrough,
     "fd00:244:2::c", 22, "shop/legacy"),
    ("v6-outside-passthrough", "fd00:244:1::a", "2001:db8::1", 443, Passthrough,
     "2001:db8::1", 443, None),
    ("v6-vip", "fd00:244:1::a", "fd00:96::20", 80, Hbone, "fd00:244:2::a", 8081,
     "shop/payments"),
    ("v4-vip-of-dual-stack-service", "10.244.1.10", "10.96.0.20", 80, Hbone, "10.244.2.10",
     8081, "shop/payments"),
    # a-v4only sorts first but has no v6 address: the v6 VIP picks
    # the endpoint it can reach over v6.
    ("v6-vip-prefers-v6-endpoint", "fd00:244:1::a", "fd00:96::21", 80, Hbone,
     "fd00:244:2::a", 8081, "shop/payments"),
    ("v6-vip-v4-only-endpoints", "fd00:244:1::a", "fd00:96::22", 80, Hbone,
     "10.244.2.20", 8081, "shop/a-v4only"),
    ("v6-only-pod-from-v4-client", "10.244.1.10", "fd00:244:2::30", 80, Hbone,
     "fd00:244:2::30", 80, "shop/v6only"),
    ("mapped-v4-source-and-destination", "::ffff:10.244.1.10", "::ffff:10.244.2.10", 80,
     Hbone, "10.244.2.10", 80, "shop/payments"),
]  # fmt: skip


@pytest.mark.parametrize("case", ROUTES, ids=[c[0] for c in ROUTES])
def test_route_v6(snap_a: Snapshot, case: tuple[object, ...]) -> None:
    _, src, dst, port, kind, dst_ip, dst_port, dest = case
    assert isinstance(src, str) and isinstance(dst, str) and isinstance(port, int)
    assert isinstance(kind, type)
    r = route(snap_a, src, dst, port)
    assert isinstance(r, kind), r
    assert not isinstance(r, Refuse)
    assert (r.dst_ip, r.dst_port) == (dst_ip, dst_port)
    assert (r.destination.key if r.destination is not None else None) == dest
    assert r.source is CHECKOUT_W
    if isinstance(r, Hbone):
        assert r.hbone_addr == (dst_ip, 15008)
        assert r.expected_identity == r.destination.identity


@pytest.mark.parametrize(
    "dst",
    ["fe80::1", "fe80::a8c1:abff:fe00:1", "FE80::1%eth0", "::1", "::", "ff02::1", "127.0.0.1",
     "0.0.0.0", "224.0.0.1", "::ffff:127.0.0.1"],
)  # fmt: skip
def test_node_scoped_destinations_are_refused(snap_a: Snapshot, dst: str) -> None:
    r = route(snap_a, "fd00:244:1::a", dst, 9099)
    assert isinstance(r, Refuse), r
    assert REFUSE_NODE_SCOPED in r.reason
    assert r.source is CHECKOUT_W


def test_ipv4_link_local_is_still_passed_through(snap_a: Snapshot) -> None:
    # Cloud instance metadata lives at 169.254.169.254 and is routed by the node.
    r = route(snap_a, "10.244.1.10", "169.254.169.254", 80)
    assert isinstance(r, Passthrough)


def test_v6_source_not_enrolled_here_is_refused(snap_a: Snapshot) -> None:
    assert isinstance(route(snap_a, "fd00:244:2::a", "fd00:244:1::b", 80), Refuse)
    assert isinstance(route(snap_a, "fd00:244:1::99", "fd00:244:2::a", 80), Refuse)


# -- decide_inbound() ----------------------------------------------------------


def connect(host: str, l3_dst: str, peer: SpiffeId, forwarded: tuple[str, int | None] | None,
            peer_addr: tuple[str, int] = ("fd00:100::b", 40000)) -> ConnectRequest:  # fmt: skip
    return ConnectRequest(
        stream_id=1,
        peer_identity=peer,
        host=host,
        port=8081,
        l3_dst=l3_dst,
        peer_addr=peer_addr,
        forwarded_for=forwarded,
    )


def test_inbound_v6_admits_checkout_as_its_v6_address(snap_b: Snapshot) -> None:
    d = decide_inbound(
        snap_b, connect("fd00:244:2::a", "fd00:244:2::a", CHECKOUT, ("fd00:244:1::a", 5000))
    )
    assert isinstance(d, Admit), d
    assert d.client == Address("fd00:244:1::a", 5000)
    assert d.transparent and d.destination is PAYMENTS_W and d.source is CHECKOUT_W
    assert (d.authz.src_ip, d.authz.dst_ip) == ("fd00:244:1::a", "fd00:244:2::a")


def test_inbound_v6_denies_a_client_the_policy_does_not_allow(snap_b: Snapshot) -> None:
    d = decide_inbound(
        snap_b, connect("fd00:244:2::a", "fd00:244:2::a", INTRUDER, ("fd00:244:1::d", 5000))
    )
    assert isinstance(d, Reject) and d.flags == FLAG_POLICY_DENIED
    assert d.source is INTRUDER_W


@pytest.mark.parametrize(
    ("host", "l3_dst"),
    [
        ("fd00:244:2::a", "fd00:244:2::c"),  # another pod of this node
        ("fd00:244:2::a", "10.244.2.10"),  # same pod, other family: still not the L3 address
        ("10.244.2.10", "fd00:244:2::a"),
    ],
)
def test_inbound_authority_must_be_the_l3_destination(
    snap_b: Snapshot, host: str, l3_dst: str
) -> None:
    d = decide_inbound(snap_b, connect(host, l3_dst, CHECKOUT, ("fd00:244:1::a", 5000)))
    assert isinstance(d, Reject), d
    assert d.flags == FLAG_NO_ROUTE
    assert "is not the connection's destination" in d.reason
    assert d.destination is None


def test_inbound_authority_compares_canonical_forms(snap_b: Snapshot) -> None:
    d = decide_inbound(
        snap_b, connect("fd00:244:2::a", "FD00:244:2:0:0:0:0:A", CHECKOUT, ("fd00:244:1::a", 1))
    )
    assert isinstance(d, Admit), d
    d4 = decide_inbound(
        snap_b, connect("10.244.2.10", "::ffff:10.244.2.10", CHECKOUT, ("10.244.1.10", 1))
    )
    assert isinstance(d4, Admit), d4


def test_inbound_v6_forwarded_address_must_belong_to_the_peer_identity(snap_b: Snapshot) -> None:
    # checkout's certificate claiming intruder's v6 address.
    d = decide_inbound(
        snap_b, connect("fd00:244:2::a", "fd00:244:2::a", CHECKOUT, ("fd00:244:1::d", 1))
    )
    assert isinstance(d, Reject) and d.flags == FLAG_POLICY_DENIED
    assert "belongs to" in d.reason


def test_inbound_mapped_peer_address_is_reported_as_ipv4(snap_b: Snapshot) -> None:
    d = decide_inbound(
        snap_b,
        connect("10.244.2.10", "10.244.2.10", INTRUDER, None, ("::ffff:10.100.0.11", 40000)),
    )
    assert d.client == Address("10.100.0.11", 40000)


# -- decide_plaintext() --------------------------------------------------------


def test_plaintext_v6_to_strict_pod_is_refused(snap_b: Snapshot) -> None:
    d = decide_plaintext(snap_b, Address("fd00:244:1::c", 3000), Address("fd00:244:2::a", 8081))
    assert isinstance(d, Reject) and d.flags == FLAG_POLICY_DENIED
    assert "STRICT" in d.reason


def test_plaintext_v6_to_a_pod_not_on_this_node_has_no_route(snap_b: Snapshot) -> None:
    d = decide_plaintext(snap_b, Address("fd00:244:1::c", 3000), Address("fd00:244:1::b", 80))
    assert isinstance(d, Reject) and d.flags == FLAG_NO_ROUTE


# -- address helpers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ("::ffff:10.244.1.10", "10.244.1.10"),
        ("10.244.1.10", "10.244.1.10"),
        ("fd00:244:1::a", "fd00:244:1::a"),
        ("::ffff:a00:1", "::ffff:a00:1"),  # not the kernel's form: left alone
        ("::1", "::1"),
    ],
)
def test_unmap_ip(raw: str, plain: str) -> None:
    assert unmap_ip(raw) == plain


def test_address_text_brackets_ipv6() -> None:
    assert str(Address("fd00::a", 8080)) == "[fd00::a]:8080"
    assert str(Address("10.0.0.1", 8080)) == "10.0.0.1:8080"


def test_family_of() -> None:
    assert family_of("fd00::a") == socket.AF_INET6
    assert family_of("10.0.0.1") == socket.AF_INET
