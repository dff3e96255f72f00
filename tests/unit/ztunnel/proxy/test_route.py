"""Table-driven tests of the pure outbound routing decision (ztunnel.proxy.route)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api.model import (
    AMBIENT,
    DATAPLANE_MODE_LABEL,
    Labels,
    Namespace,
    Service,
    ServicePort,
    Workload,
)
from controller.api.spiffe import SpiffeId
from node.state import Snapshot, build_snapshot
from ztunnel.proxy.route import (
    Hbone,
    Passthrough,
    Refuse,
    RoundRobin,
    Route,
    SameNode,
    random_chooser,
    route,
)

NODE = "node-a"


def wl(
    name: str,
    ns: str,
    node: str,
    *ips: str,
    sa: str = "default",
    enrolled: bool = True,
    ready: bool = True,
) -> Workload:
    return Workload(
        name=name,
        namespace=ns,
        service_account=sa,
        node=node,
        ips=ips,
        enrolled=enrolled,
        ready=ready,
        labels=Labels({"app": name}),
    )


def svc(name: str, vip: str, ports: list[tuple[int, int]], endpoints: list[str]) -> Service:
    return Service(
        name=name,
        namespace="default",
        vips=(vip,),
        ports=tuple(ServicePort(p, t) for p, t in ports),
        endpoints=tuple(f"default/{e}" if "/" not in e else e for e in endpoints),
    )


WORKLOADS = [
    wl("client", "default", NODE, "10.0.1.10", sa="client"),
    wl("local-srv", "default", NODE, "10.0.1.11", sa="server"),
    wl("optout-local", "default", NODE, "10.0.1.12", enrolled=False),
    wl("client6", "default", NODE, "fd00::10", sa="client"),
    wl("remote-srv", "default", "node-b", "10.0.2.10", sa="server"),
    wl("remote-srv2", "default", "node-b", "10.0.2.11", sa="server"),
    wl("legacy-remote", "legacy", "node-b", "10.0.2.20", enrolled=False),
    wl("notready", "default", "node-b", "10.0.2.30", sa="server", ready=False),
    wl("dual", "default", "node-b", "10.0.2.40", "fd00::40", sa="dual"),
]
SERVICES = [
    svc("svc-remote", "10.96.0.10", [(80, 8080)], ["remote-srv", "remote-srv2"]),
    svc("svc-local", "10.96.0.11", [(80, 8080)], ["local-srv"]),
    svc("svc-empty", "10.96.0.12", [(80, 8080)], []),
    svc("svc-notready", "10.96.0.13", [(80, 8080)], ["notready"]),
    svc("svc-legacy", "10.96.0.14", [(5432, 5432)], ["legacy/legacy-remote"]),
    svc("svc-dual", "fd00:96::15", [(443, 8443)], ["dual"]),
    svc("svc-multi", "10.96.0.16", [(80, 8080), (443, 8443)], ["remote-srv"]),
    svc("svc-ghost", "10.96.0.17", [(80, 8080)], ["ghost"]),
]


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    namespaces = [
        Namespace("default", Labels({DATAPLANE_MODE_LABEL: AMBIENT})),
        Namespace("legacy"),
    ]
    return build_snapshot(
        NODE, [*namespaces, *WORKLOADS, *SERVICES], epoch="e1", version=1, trust_bundle=None
    )


def ident(ns: str, sa: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://cluster.local/ns/{ns}/sa/{sa}")


@dataclass(frozen=True)
class Case:
    id: str
    src: str
    dst: str
    port: int
    kind: type
    dst_ip: str | None = None
    dst_port: int | None = None
    dest: str | None = None  # destination workload key
    identity: SpiffeId | None = None
    service: str | None = None
    reason: str | None = None  # substring of the reason


CASES = [
    Case(
        "unknown-source",
        "10.9.9.9",
        "10.0.2.10",
        80,
        Refuse,
        reason="source not a local enrolled workload",
    ),
    Case(
        "remote-workload-as-source",
        "10.0.2.10",
        "10.0.2.11",
        80,
        Refuse,
        reason="source not a local enrolled workload",
    ),
    Case(
        "opted-out-local-source",
        "10.0.1.12",
        "10.0.2.10",
        80,
        Refuse,
        reason="source not a local enrolled workload",
    ),
    Case(
        "garbage-source",
        "not-an-ip",
        "10.0.2.10",
        80,
        Refuse,
        reason="source not a local enrolled workload",
    ),
    Case(
        "direct-remote-enrolled",
        "10.0.1.10",
        "10.0.2.10",
        8080,
        Hbone,
        "10.0.2.10",
        8080,
        "default/remote-srv",
        ident("default", "server"),
    ),
    Case(
        "direct-local-enrolled",
        "10.0.1.10",
        "10.0.1.11",
        8080,
        SameNode,
        "10.0.1.11",
        8080,
        "default/local-srv",
    ),
    Case(
        "direct-local-opted-out",
        "10.0.1.10",
        "10.0.1.12",
        9000,
        Passthrough,
        "10.0.1.12",
        9000,
        "default/optout-local",
        reason="not enrolled",
    ),
    Case(
        "direct-remote-not-enrolled",
        "10.0.1.10",
        "10.0.2.20",
        5432,
        Passthrough,
        "10.0.2.20",
        5432,
        "legacy/legacy-remote",
        reason="not enrolled",
    ),
    Case(
        "unknown-destination",
        "10.0.1.10",
        "93.184.216.34",
        443,
        Passthrough,
        "93.184.216.34",
        443,
        reason="not a known workload",
    ),
    Case(
        "service-remote-endpoints",
        "10.0.1.10",
        "10.96.0.10",
        80,
        Hbone,
        "10.0.2.10",
        8080,
        "default/remote-srv",
        ident("default", "server"),
        "default/svc-remote",
    ),
    Case(
        "service-local-endpoint",
        "10.0.1.10",
        "10.96.0.11",
        80,
        SameNode,
        "10.0.1.11",
        8080,
        "default/local-srv",
        service="default/svc-local",
    ),
    Case(
        "service-no-endpoints", "10.0.1.10", "10.96.0.12", 80, Refuse, reason="no healthy endpoints"
    ),
    Case(
        "service-endpoints-not-ready",
        "10.0.1.10",
        "10.96.0.13",
        80,
        Refuse,
        reason="no healthy endpoints",
    ),
    Case(
        "service-endpoint-unknown-workload",
        "10.0.1.10",
        "10.96.0.17",
        80,
        Refuse,
        reason="no healthy endpoints",
    ),
    Case(
        "service-not-enrolled-endpoint",
        "10.0.1.10",
        "10.96.0.14",
        5432,
        Passthrough,
        "10.0.2.20",
        5432,
        "legacy/legacy-remote",
        service="default/svc-legacy",
    ),
    Case(
        "service-vip-unknown-port",
        "10.0.1.10",
        "10.96.0.10",
        81,
        Refuse,
        reason="no service port 81",
    ),
    Case(
        "service-second-port",
        "10.0.1.10",
        "10.96.0.16",
        443,
        Hbone,
        "10.0.2.10",
        8443,
        "default/remote-srv",
        ident("default", "server"),
        "default/svc-multi",
    ),
    Case(
        "service-ipv6-vip-picks-ipv6-endpoint-ip",
        "fd00::10",
        "fd00:96::15",
        443,
        Hbone,
        "fd00::40",
        8443,
        "default/dual",
        ident("default", "dual"),
        "default/svc-dual",
    ),
    Case(
        "ipv4-mapped-source",
        "::ffff:10.0.1.10",
        "10.0.2.10",
        80,
        Hbone,
        "10.0.2.10",
        80,
        "default/remote-srv",
        ident("default", "server"),
    ),
    Case(
        "ipv4-mapped-destination",
        "10.0.1.10",
        "::ffff:10.0.2.11",
        80,
        Hbone,
        "10.0.2.11",
        80,
        "default/remote-srv2",
        ident("default", "server"),
    ),
    Case(
        "direct-not-ready-pod-still-routed",
        "10.0.1.10",
        "10.0.2.30",
        8080,
        Hbone,
        "10.0.2.30",
        8080,
        "default/notready",
        ident("default", "server"),
    ),
    Case("self", "10.0.1.10", "10.0.1.10", 8080, SameNode, "10.0.1.10", 8080, "default/client"),
    Case(
        "ipv6-source-to-ipv4-dest",
        "fd00::10",
        "10.0.2.11",
        80,
        Hbone,
        "10.0.2.11",
        80,
        "default/remote-srv2",
        ident("default", "server"),
    ),
    Case(
        "direct-dual-stack-by-v6",
        "10.0.1.10",
        "fd00::40",
        22,
        Hbone,
        "fd00::40",
        22,
        "default/dual",
        ident("default", "dual"),
    ),
    Case(
        "uncompressed-ipv6-destination",
        "10.0.1.10",
        "fd00:0:0:0:0:0:0:40",
        22,
        Hbone,
        "fd00::40",
        22,
        "default/dual",
        ident("default", "dual"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_route(snap: Snapshot, case: Case) -> None:
    r: Route = route(snap, case.src, case.dst, case.port)
    assert isinstance(r, case.kind), r
    if isinstance(r, Refuse):
        assert case.reason is not None and case.reason in r.reason
        return
    assert r.dst_ip == case.dst_ip
    assert r.dst_port == case.dst_port
    assert r.source is not None and r.source.enrolled and r.source.node == NODE
    dest = r.destination
    assert (dest.key if dest is not None else None) == case.dest
    assert (r.service.key if r.service is not None else None) == case.service
    if isinstance(r, Hbone):
        assert r.expected_identity == case.identity
        assert r.hbone_addr == (case.dst_ip, 15008)
    if isinstance(r, Passthrough) and case.reason is not None:
        assert case.reason in r.reason


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 20


def test_round_robin_cycles_over_ready_endpoints(snap: Snapshot) -> None:
    rr = RoundRobin()
    picks = [route(snap, "10.0.1.10", "10.96.0.10", 80, choose=rr) for _ in range(4)]
    assert [p.dst_ip for p in picks if isinstance(p, Hbone)] == [
        "10.0.2.10",
        "10.0.2.11",
        "10.0.2.10",
        "10.0.2.11",
    ]


def test_random_chooser_is_repeatable_with_a_seed(snap: Snapshot) -> None:
    def run(seed: int) -> list[str]:
        choose = random_chooser(random.Random(seed))
        out = []
        for _ in range(20):
            r = route(snap, "10.0.1.10", "10.96.0.10", 80, choose=choose)
            assert isinstance(r, Hbone)
            out.append(r.dst_ip)
        return out

    assert run(7) == run(7)
    assert set(run(7)) == {"10.0.2.10", "10.0.2.11"}


def test_chooser_only_sees_healthy_endpoints() -> None:
    ws = [
        wl("client", "default", NODE, "10.0.1.10"),
        wl("up", "default", "node-b", "10.0.2.1"),
        wl("down", "default", "node-b", "10.0.2.2", ready=False),
    ]
    s = build_snapshot(
        NODE,
        [*ws, svc("s", "10.96.1.1", [(80, 80)], ["up", "down"])],
        epoch="e",
        version=1,
        trust_bundle=None,
    )
    seen: list[list[str]] = []

    def choose(service: Service, endpoints: Sequence[Workload]) -> Workload:
        seen.append([w.name for w in endpoints])
        return endpoints[-1]

    r = route(s, "10.0.1.10", "10.96.1.1", 80, choose=choose)
    assert seen == [["up"]]
    assert isinstance(r, Hbone) and r.destination.name == "up"


def test_route_is_pure(snap: Snapshot) -> None:
    assert route(snap, "10.0.1.10", "10.0.2.10", 80) == route(snap, "10.0.1.10", "10.0.2.10", 80)


addresses = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["10.0.1.10", "10.96.0.10", "::ffff:10.0.1.10", "fd00::10", ""]),
    st.text(max_size=40),
)


@given(addresses, addresses, st.integers(min_value=0, max_value=65535))
def test_route_never_raises_and_fails_closed_on_unknown_sources(
    src: str, dst: str, port: int
) -> None:
    snap = _SNAP
    r = route(snap, src, dst, port)
    assert isinstance(r, Hbone | SameNode | Passthrough | Refuse)
    if snap.local_workload_by_ip(src) is None:
        assert isinstance(r, Refuse) and r.reason == "source not a local enrolled workload"
    if isinstance(r, Hbone):
        assert r.destination.enrolled and r.destination.node != NODE
        assert r.hbone_addr == (r.dst_ip, 15008) and r.dst_ip in r.destination.ips


_SNAP = build_snapshot(
    NODE,
    [Namespace("default", Labels({DATAPLANE_MODE_LABEL: AMBIENT})), *WORKLOADS, *SERVICES],
    epoch="e1",
    version=1,
    trust_bundle=None,
)
