"""build_state: enrollment, Service endpoints and cross-object checks (shared by all sources)."""

from __future__ import annotations

import pytest

from controller.api.model import (
    AuthorizationPolicy,
    Labels,
    Namespace,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    Service,
    ServicePort,
    Workload,
)
from controller.registry import RegistryError, build_state, is_enrolled

AMBIENT = Labels({"veil.io/dataplane-mode": "ambient"})


def wl(
    name: str, ns: str = "shop", ip: str = "10.0.0.1", ready: bool = True, **labels: str
) -> Workload:
    return Workload(name, ns, "sa", "node-a", (ip,), Labels(labels), ready=ready)


@pytest.mark.parametrize(
    ("ns_labels", "pod_labels", "enrolled"),
    [
        ({"veil.io/dataplane-mode": "ambient"}, {}, True),
        ({"veil.io/dataplane-mode": "ambient"}, {"veil.io/dataplane-mode": "none"}, False),
        # Any other pod value keeps the namespace's choice.
        ({"veil.io/dataplane-mode": "ambient"}, {"veil.io/dataplane-mode": "ambient"}, True),
        ({}, {}, False),
        ({}, {"veil.io/dataplane-mode": "ambient"}, False),  # pods cannot enroll themselves
        ({"veil.io/dataplane-mode": "none"}, {}, False),
        ({"veil.io/dataplane-mode": "Ambient"}, {}, False),  # exact value only
    ],
)
def test_enrollment_rule(
    ns_labels: dict[str, str], pod_labels: dict[str, str], enrolled: bool
) -> None:
    ns = Namespace("shop", Labels(ns_labels))
    w = Workload("a", "shop", "sa", "n", ("10.0.0.1",), Labels(pod_labels))
    assert is_enrolled(ns, w) is enrolled
    state = build_state("cluster.local", [ns], [w])
    assert state.workloads[0].enrolled is enrolled


def test_inputs_derived_fields_are_recomputed() -> None:
    w = Workload("a", "shop", "sa", "n", ("10.0.0.1",), enrolled=True, trust_domain="other.td")
    s = Service(
        "s", "shop", (), (ServicePort(80, 80),), Labels({"app": "x"}), endpoints=("shop/zzz",)
    )
    state = build_state("example.org", [Namespace("shop")], [w], [s])
    assert state.workloads[0].enrolled is False
    assert state.workloads[0].trust_domain == "example.org"
    assert str(state.workloads[0].identity) == "spiffe://example.org/ns/shop/sa/sa"
    assert state.services[0].endpoints == ()


def test_service_endpoints_are_ready_matching_workloads_of_the_namespace() -> None:
    workloads = [
        wl("p1", ip="10.0.0.1", app="payments", tier="x"),
        wl("p2", ip="10.0.0.2", app="payments", ready=False),
        wl("p3", ip="10.0.0.3", app="payments"),
        wl("c1", ip="10.0.0.4", app="checkout"),
        wl("p4", ns="web", ip="10.0.0.5", app="payments"),
    ]
    services = [
        Service(
            "payments",
            "shop",
            ("10.96.0.1",),
            (ServicePort(80, 8080),),
            Labels({"app": "payments"}),
        ),
        Service(
            "p1only", "shop", (), (ServicePort(80, 80),), Labels({"app": "payments", "tier": "x"})
        ),
        Service("none", "shop", (), (ServicePort(80, 80),), Labels({"app": "nothing"})),
        Service("noselector", "shop", (), (ServicePort(80, 80),)),
    ]
    state = build_state("cluster.local", [Namespace("shop"), Namespace("web")], workloads, services)
    eps = {s.name: s.endpoints for s in state.services}
    assert eps == {
        "payments": ("shop/p1", "shop/p3"),
        "p1only": ("shop/p1",),
        "none": (),
        "noselector": (),
    }


def test_output_is_sorted_and_deterministic() -> None:
    ws = [wl("b", ip="10.0.0.2"), wl("a", ip="10.0.0.1")]
    one = build_state("cluster.local", [Namespace("shop")], ws)
    two = build_state("cluster.local", [Namespace("shop")], list(reversed(ws)))
    assert one == two
    assert [w.name for w in one.workloads] == ["a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workloads": [wl("a"), wl("a", ip="10.0.0.2")]}, "Workload shop/a: duplicate key shop/a"),
        (
            {"workloads": [wl("a"), wl("b")]},
            'Workload shop/b: field "ips[0]": 10.0.0.1 is already used by Workload shop/a',
        ),
        (
            {"workloads": [wl("a", ns="web")]},
            "Workload web/a: field \"namespace\": namespace 'web' is not declared",
        ),
        (
            {
                "workloads": [wl("a")],
                "services": [Service("s", "shop", ("10.0.0.1",), (ServicePort(80, 80),))],
            },
            'Service shop/s: field "vips[0]": 10.0.0.1 is already used by Workload shop/a',
        ),
        (
            {
                "services": [
                    Service("s", "shop", ("10.96.0.1",), (ServicePort(80, 80),)),
                    Service("t", "shop", ("10.96.0.1",), (ServicePort(80, 80),)),
                ]
            },
            'Service shop/t: field "vips[0]": 10.96.0.1 is already used by Service shop/s',
        ),
        (
            {"authorization_policies": [AuthorizationPolicy("p", "web", PolicyAction.DENY)]},
            "AuthorizationPolicy web/p: field \"namespace\": namespace 'web' is not declared",
        ),
        (
            {"peer_authentications": [PeerAuthentication("p", "web", PeerAuthMode.STRICT)]},
            "PeerAuthentication web/p",
        ),
        ({"trust_domain": "Bad Domain"}, 'field "trustDomain": invalid trust domain'),
        (
            {"namespaces": [Namespace("shop"), Namespace("shop")]},
            "Namespace shop: duplicate key shop",
        ),
    ],
)
def test_cross_object_checks(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "trust_domain": "cluster.local",
        "namespaces": [Namespace("shop")],
        "workloads": [],
    }
    args.update(kwargs)
    with pytest.raises(RegistryError) as info:
        build_state(**args)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_root_namespace_policies_are_mesh_wide_without_a_namespace_object() -> None:
    state = build_state(
        "cluster.local",
        [],
        [],
        authorization_policies=[AuthorizationPolicy("deny", "veil-system", PolicyAction.DENY)],
        peer_authentications=[PeerAuthentication("default", "veil-system", PeerAuthMode.STRICT)],
    )
    assert state.authorization_policies[0].namespace == "veil-system"


def test_many_services_over_a_large_namespace_stay_fast() -> None:
    import time

    workloads = [
        wl(f"w{i}", ip=f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", app=f"a{i % 1000}")
        for i in range(10_000)
    ]
    services = [
        Service(f"s{i}", "shop", (), (ServicePort(80, 80),), Labels({"app": f"a{i}"}))
        for i in range(1000)
    ]
    start = time.perf_counter()
    state = build_state("cluster.local", [Namespace("shop", AMBIENT)], workloads, services)
    assert time.perf_counter() - start < 5.0
    assert all(len(s.endpoints) == 10 for s in state.services)
