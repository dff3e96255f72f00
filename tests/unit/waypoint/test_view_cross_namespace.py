"""build_view() for a waypoint that serves other namespaces
(``veil.io/use-waypoint-namespace``): which destinations, which policies."""

from __future__ import annotations

from controller.api.model import (
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    AuthorizationPolicy,
    JwtRule,
    Labels,
    Namespace,
    Operation,
    PolicyAction,
    RequestAuthentication,
    Rule,
    Service,
    ServicePort,
    TargetRef,
    Workload,
)
from node.state import build_snapshot
from waypoint.view import WaypointView, build_view

MESH_LABELS = {USE_WAYPOINT_LABEL: "mesh-wp", USE_WAYPOINT_NAMESPACE_LABEL: "mesh"}
PAY = Workload("pay-1", "shop", "pay", "n1", ("10.0.0.1",), Labels({"app": "pay"}))
ORD = Workload("ord-1", "orders", "ord", "n1", ("10.0.1.1",), Labels({"app": "ord"}))
HOME = Workload("home-1", "mesh", "home", "n1", ("10.0.2.1",), Labels({"app": "home"}))
WP = Workload(
    "wp-0", "mesh", "mesh-wp", "n9", ("10.0.9.1",), Labels({"veil.io/waypoint": "mesh-wp"})
)
PAY_SVC = Service(
    "pay", "shop", ("10.96.0.1",), (ServicePort(80, 8080),), Labels({"app": "pay"}),
    endpoints=(PAY.key,), use_waypoint="mesh-wp", use_waypoint_namespace="mesh",
)  # fmt: skip
ORD_SVC = Service(
    "ord", "orders", ("10.96.1.1",), (ServicePort(80, 8080),), Labels({"app": "ord"}),
    endpoints=(ORD.key,),
)  # fmt: skip
# Labelled "mesh-wp" without a namespace: a waypoint in "shop", not ours.
SAME_NAME = Service(
    "cart", "shop", ("10.96.0.2",), (ServicePort(80, 8080),), use_waypoint="mesh-wp"
)
HOME_SVC = Service(
    "home", "mesh", ("10.96.2.1",), (ServicePort(80, 8080),), Labels({"app": "home"}),
    endpoints=(HOME.key,),
)  # fmt: skip


def deny(name: str, ns: str, ref: TargetRef) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        name, ns, PolicyAction.DENY,
        rules=(Rule(operations=(Operation(methods=("DELETE",)),)),), target_refs=(ref,),
    )  # fmt: skip


POLICIES = [
    # A Service reference is read in the Service's own namespace ...
    deny("pay-in-shop", "shop", TargetRef("Service", "pay")),
    # ... so the same reference from the waypoint's namespace names nothing here.
    deny("pay-in-mesh", "mesh", TargetRef("Service", "pay")),
    # A Gateway reference is read in the waypoint's namespace.
    deny("gw-in-mesh", "mesh", TargetRef("Gateway", "mesh-wp")),
    deny("gw-in-shop", "shop", TargetRef("Gateway", "mesh-wp")),
]
JWT_SHOP = RequestAuthentication("jwt", "shop", (JwtRule("https://idp-shop", jwks='{"keys": []}'),))
JWT_MESH = RequestAuthentication("jwt", "mesh", (JwtRule("https://idp-mesh", jwks='{"keys": []}'),))


def view(*extra: object) -> WaypointView:
    resources = [
        Namespace("shop"),
        Namespace("orders", Labels(MESH_LABELS)),
        Namespace("mesh"),
        PAY, ORD, HOME, WP, PAY_SVC, ORD_SVC, SAME_NAME, HOME_SVC,
        *POLICIES, JWT_SHOP, JWT_MESH, *extra,
    ]  # fmt: skip
    snap = build_snapshot("n9", resources, epoch="e", version=1, trust_bundle=None)
    return build_view(snap, "mesh", "mesh-wp", "mesh-wp")


def test_serves_the_namespaces_and_services_that_name_it_from_elsewhere() -> None:
    v = build_view(
        build_snapshot(
            "n9",
            [Namespace("shop"), Namespace("orders", Labels(MESH_LABELS)), Namespace("mesh"),
             PAY, ORD, HOME, WP, PAY_SVC, ORD_SVC, SAME_NAME, HOME_SVC],
            epoch="e", version=1, trust_bundle=None,
        ),
        "mesh", "mesh-wp", "mesh-wp",
    )  # fmt: skip
    assert [d.key for d in v.destinations()] == ["service:orders/ord:80", "service:shop/pay:80"]
    pay = v.resolve("10.96.0.1", 80)
    assert pay is not None and [e.ip for e in pay.endpoints] == ["10.0.0.1"]
    # Workload IPs: every workload of "orders" (namespace label); "pay-1" as the
    # endpoint of a Service that uses us; nothing of "mesh" itself (not opted in).
    assert sorted(v.workloads) == ["10.0.0.1", "10.0.1.1"]
    assert v.resolve("10.96.0.2", 80) is None  # names a waypoint of "shop"
    assert v.resolve("10.96.2.1", 80) is None
    assert v.resolve("10.0.2.1", 8080) is None
    assert str(v.identity) == "spiffe://cluster.local/ns/mesh/sa/mesh-wp"


def test_policies_attach_by_service_in_its_namespace_and_by_gateway_in_the_waypoints() -> None:
    v = view()
    pay = v.resolve("10.96.0.1", 80)
    assert pay is not None
    assert sorted(pay.policies.keys) == ["mesh/gw-in-mesh", "shop/pay-in-shop"]
    ord_ = v.resolve("10.96.1.1", 80)
    assert ord_ is not None and list(ord_.policies.keys) == ["mesh/gw-in-mesh"]
    workload = v.resolve("10.0.0.1", 8080)
    assert workload is not None
    assert sorted(workload.policies.keys) == ["mesh/gw-in-mesh", "shop/pay-in-shop"]


def test_namespace_wide_request_authentication_is_the_destinations() -> None:
    v = view()
    pay = v.resolve("10.96.0.1", 80)
    assert [p.issuer for p in pay.authn.providers] == ["https://idp-shop"]
    ord_ = v.resolve("10.96.1.1", 80)
    assert [p.issuer for p in ord_.authn.providers] == []


def test_the_service_label_pair_wins_over_its_namespaces() -> None:
    # orders/ord names a waypoint of its own namespace: no longer ours.
    away = Service(
        "ord", "orders", ("10.96.1.1",), (ServicePort(80, 8080),), Labels({"app": "ord"}),
        endpoints=(ORD.key,), use_waypoint="orders-wp",
    )  # fmt: skip
    v = view(away)
    assert v.resolve("10.96.1.1", 80) is None
    # Its pods are still in a namespace that uses us.
    assert v.resolve("10.0.1.1", 8080) is not None
