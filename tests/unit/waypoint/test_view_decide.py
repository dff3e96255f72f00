"""The waypoint's pure parts: the view of what it serves, the per-request
decision, endpoint balancing, and the contract round trip of the L7 fields."""

from __future__ import annotations

import pytest

from controller.api.model import (
    AuthorizationPolicy,
    Condition,
    JwtHeader,
    JwtRule,
    Labels,
    Namespace,
    Operation,
    PolicyAction,
    RequestAuthentication,
    Rule,
    Service,
    ServicePort,
    Source,
    TargetRef,
    TrustBundle,
    WatchUpdate,
    Workload,
)
from controller.api.wire import watch_response_to_pb, watch_update_from_pb
from node.state import build_snapshot
from waypoint.balance import Balancer
from waypoint.decide import Forward, PeerFacts, Respond, decide
from waypoint.view import build_view, port_speaks_http2

NS = Namespace("shop", Labels({"veil.io/dataplane-mode": "ambient", "veil.io/use-waypoint": "wp"}))
PAY = [
    Workload(
        f"payments-{i}", "shop", "payments", "n1", (f"10.0.0.{i}",), Labels({"app": "payments"})
    )
    for i in (1, 2)
]
DOWN = Workload(
    "payments-3", "shop", "payments", "n1", ("10.0.0.3",), Labels({"app": "payments"}), ready=False
)
WP = Workload("wp-1", "shop", "wp", "n9", ("10.0.9.1",), Labels({"veil.io/waypoint": "wp"}))
SVC = Service(
    "payments", "shop", ("10.96.0.20",), (ServicePort(80, 8080),), Labels({"app": "payments"}),
    endpoints=tuple(w.key for w in (*PAY, DOWN)),
)  # fmt: skip
OPT_OUT = Service("cart", "shop", ("10.96.0.30",), (ServicePort(80, 8080),), use_waypoint="other")
DENY_DELETE = AuthorizationPolicy(
    "no-delete", "shop", PolicyAction.DENY,
    rules=(Rule(operations=(Operation(methods=("DELETE",)),)),),
    target_refs=(TargetRef("Service", "payments"),),
)  # fmt: skip
SELECTOR_POLICY = AuthorizationPolicy("l4", "shop", PolicyAction.DENY, rules=(Rule(),))
JWT = RequestAuthentication(
    "jwt",
    "shop",
    (JwtRule("https://idp", jwks='{"keys": []}'),),
    target_refs=(TargetRef("Gateway", "wp"),),
)
PEER = PeerFacts("cluster.local/ns/shop/sa/checkout", "shop", "10.0.1.1")


def view(*extra: object):  # type: ignore[no-untyped-def]
    resources = [NS, *PAY, DOWN, WP, SVC, OPT_OUT, DENY_DELETE, SELECTOR_POLICY, JWT, *extra]
    snap = build_snapshot("n9", resources, epoch="e", version=3, trust_bundle=None)  # type: ignore[arg-type]
    return build_view(snap, "shop", "wp", "wp")


def no_keys(_uri: str) -> None:
    return None


def test_view_resolves_services_and_workloads() -> None:
    v = view()
    dest = v.resolve("10.96.0.20", 80)
    assert dest is not None and dest.kind == "service"
    assert [e.ip for e in dest.endpoints] == ["10.0.0.1", "10.0.0.2"]  # not the unready one
    assert {e.port for e in dest.endpoints} == {8080}
    assert dest.policies.keys == ("shop/no-delete",)  # attached only; selector policies are L4
    assert [p.issuer for p in dest.authn.providers] == ["https://idp"]
    assert v.resolve("10.96.0.20", 81) is None
    assert v.resolve("10.96.0.30", 80) is None  # cart uses another waypoint
    wl = v.resolve("10.0.0.1", 8080)
    assert wl is not None and wl.kind == "workload" and wl.endpoints[0].port == 8080
    assert v.resolve("10.0.9.1", 15008) is None  # the waypoint itself is no destination
    assert v.identity is not None and str(v.identity) == "spiffe://cluster.local/ns/shop/sa/wp"


def test_decide() -> None:
    dest = view().resolve("10.96.0.20", 80)
    assert dest is not None
    d = decide(dest, "GET", "/./pay?x=1", "payments", {}, PEER, no_keys)
    assert isinstance(d, Forward) and d.target == "/pay?x=1"
    d = decide(dest, "DELETE", "/pay", "payments", {}, PEER, no_keys)
    assert isinstance(d, Respond) and d.status == 403 and d.policy == "shop/no-delete"
    assert d.body == b"RBAC: access denied"
    d = decide(dest, "GET", "/a%2Fb", "payments", {}, PEER, no_keys)
    assert isinstance(d, Respond) and d.status == 400
    d = decide(dest, "GET", "/", "payments", {"authorization": "Bearer x.y.z"}, PEER, no_keys)
    assert isinstance(d, Respond) and d.status == 401
    assert dict(d.headers)["www-authenticate"].startswith("Bearer")


def test_no_ready_endpoint_is_503() -> None:
    down = Service("down", "shop", ("10.96.0.40",), (ServicePort(80, 80),), endpoints=(DOWN.key,))
    dest = view(down).resolve("10.96.0.40", 80)
    assert dest is not None and dest.endpoints == ()
    d = decide(dest, "GET", "/", "down", {}, PEER, no_keys)
    assert isinstance(d, Respond) and d.status == 503


def test_balancer_spreads_per_request_and_prefers_least_loaded() -> None:
    dest = view().resolve("10.96.0.20", 80)
    assert dest is not None
    b = Balancer()
    picks = [b.pick(dest.endpoints) for _ in range(2)]
    assert {p.ip for p in picks} == {"10.0.0.1", "10.0.0.2"}
    b.release(picks[0])
    assert b.pick(dest.endpoints) == picks[0]  # the other still has one in flight
    for _ in range(4):
        b.release(picks[0])
        b.release(picks[1])
    seq = []
    for _ in range(4):
        e = b.pick(dest.endpoints)
        seq.append(e.ip)
        b.release(e)
    assert set(seq) == {"10.0.0.1", "10.0.0.2"}


def test_l7_fields_survive_the_wire() -> None:
    policy = AuthorizationPolicy(
        "p", "shop", PolicyAction.ALLOW,
        rules=(Rule(
            sources=(Source(principals=("a",), request_principals=("i/s",), not_request_principals=("x",)),),
            operations=(Operation(ports=(80,), hosts=("h",), not_hosts=("nh",), methods=("GET",),
                                  not_methods=("PUT",), paths=("/p*",), not_paths=("/q",)),),
            conditions=(Condition("request.auth.claims[role]", ("admin",), ("guest",)),),
        ),),
        target_refs=(TargetRef("Gateway", "wp", "gateway.networking.k8s.io"),),
    )  # fmt: skip
    ra = RequestAuthentication(
        "r", "shop",
        (JwtRule("iss", ("aud",), "{}", "", (JwtHeader("x-jwt", "T "),), True),
         JwtRule("iss2", jwks_uri="http://127.0.0.1/j")),
        selector=Labels({"app": "x"}),
    )  # fmt: skip
    svc = Service("s", "shop", ("10.96.0.1",), (ServicePort(80, 80),), use_waypoint="wp")
    update = WatchUpdate(
        "e", 1, True, (policy, ra, svc, NS), trust_bundle=TrustBundle("cluster.local", ())
    )
    back = watch_update_from_pb(watch_response_to_pb(update))
    assert back.upserts == (policy, ra, svc, NS)
    assert NS.use_waypoint == "wp" and WP.waypoint == "wp"


@pytest.mark.parametrize(
    ("name", "http2"),
    [
        ("grpc", True),
        ("grpc-api", True),
        ("GRPC", True),
        ("http2", True),
        ("h2c-internal", True),
        ("grpc-web", False),
        ("http", False),
        ("http-grpc", False),
        ("", False),
        ("tcp", False),
    ],
)
def test_port_names_declare_http2_as_istio_does(name: str, http2: bool) -> None:
    assert port_speaks_http2(name) is http2
