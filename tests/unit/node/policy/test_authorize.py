"""Table-driven tests of L4 authorization (node.policy.authorize / evaluate)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from controller.api.model import (
    ROOT_NAMESPACE,
    AuthorizationPolicy,
    Labels,
    Operation,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    Rule,
    Source,
    WatchUpdate,
    Workload,
)
from controller.api.spiffe import SpiffeId
from node.policy import (
    Connection,
    Verdict,
    authorize,
    effective_mode,
    evaluate,
    plaintext_verdict,
    recheck,
)
from node.state import StateStore, build_snapshot

SERVER = Workload(
    name="payments-1",
    namespace="prod",
    service_account="payments",
    node="node-a",
    ips=("10.0.1.20",),
    labels=Labels({"app": "payments", "tier": "backend"}),
    enrolled=True,
)
CHECKOUT = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/checkout")
SHOP_OTHER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
PROD_ID = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/batch")
FOREIGN = SpiffeId.parse("spiffe://other.domain/ns/shop/sa/checkout")
NODE_ID = SpiffeId.parse("spiffe://cluster.local/veil/node/node-b")


def allow(
    name: str,
    *rules: Rule,
    ns: str = "prod",
    selector: dict[str, str] | None = None,
) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        name,
        ns,
        PolicyAction.ALLOW,
        tuple(rules),
        Labels(selector) if selector is not None else None,
    )


def deny(
    name: str,
    *rules: Rule,
    ns: str = "prod",
    selector: dict[str, str] | None = None,
) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        name,
        ns,
        PolicyAction.DENY,
        tuple(rules),
        Labels(selector) if selector is not None else None,
    )


def frm(*sources: Source, to: tuple[Operation, ...] = ()) -> Rule:
    return Rule(sources=sources, operations=to)


def to(*ops: Operation) -> Rule:
    return Rule(operations=ops)


def conn(
    identity: SpiffeId | None = CHECKOUT, src_ip: str = "10.0.2.5", port: int = 8080
) -> Connection:
    return Connection(src_ip=src_ip, dst_ip="10.0.1.20", dst_port=port, src_identity=identity)


@dataclass(frozen=True)
class Case:
    id: str
    policies: list[AuthorizationPolicy]
    conn: Connection
    allowed: bool
    policy: str | None = None
    reason: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


P_CHECKOUT = allow("from-checkout", frm(Source(principals=("cluster.local/ns/shop/sa/checkout",))))

CASES = [
    Case("no-policies", [], conn(), True, reason="no ALLOW policy applies"),
    Case("allow-istio-form-principal", [P_CHECKOUT], conn(), True, "prod/from-checkout"),
    Case(
        "allow-other-principal-denied",
        [P_CHECKOUT],
        conn(SHOP_OTHER),
        False,
        reason="no ALLOW policy matched",
    ),
    Case(
        "allow-spiffe-form-principal",
        [allow("p", frm(Source(principals=("spiffe://cluster.local/ns/shop/sa/checkout",))))],
        conn(),
        True,
        "prod/p",
    ),
    Case("allow-plaintext-never-matches-principals", [P_CHECKOUT], conn(None), False),
    Case(
        "star-principal-needs-authentication",
        [allow("any-authn", frm(Source(principals=("*",))))],
        conn(None),
        False,
    ),
    Case(
        "star-principal-any-identity",
        [allow("any-authn", frm(Source(principals=("*",))))],
        conn(SHOP_OTHER),
        True,
        "prod/any-authn",
    ),
    Case(
        "deny-beats-allow",
        [P_CHECKOUT, deny("block-checkout", frm(Source(namespaces=("shop",))))],
        conn(),
        False,
        "prod/block-checkout",
        "denied by DENY policy",
    ),
    Case(
        "non-matching-deny-alone-allows",
        [deny("block-shop", frm(Source(namespaces=("shop",))))],
        conn(PROD_ID),
        True,
    ),
    Case("allow-with-no-rules-denies-all", [allow("nothing")], conn(), False),
    Case(
        "allow-with-empty-rule-allows-all",
        [allow("everything", Rule())],
        conn(None),
        True,
        "prod/everything",
    ),
    Case(
        "allow-empty-source-matches-everything",
        [allow("empty-src", frm(Source()))],
        conn(None),
        True,
        "prod/empty-src",
    ),
    Case("namespaces-match", [allow("ns", frm(Source(namespaces=("shop",))))], conn(), True),
    Case(
        "namespaces-plaintext-no-match",
        [allow("ns", frm(Source(namespaces=("shop",))))],
        conn(None),
        False,
    ),
    Case(
        "namespaces-node-identity-no-match",
        [allow("ns", frm(Source(namespaces=("shop",))))],
        conn(NODE_ID),
        False,
    ),
    Case(
        "not-namespaces-other-ns",
        [allow("nn", frm(Source(not_namespaces=("prod",))))],
        conn(),
        True,
    ),
    Case(
        "not-namespaces-listed-ns",
        [allow("nn", frm(Source(not_namespaces=("prod",))))],
        conn(PROD_ID),
        False,
    ),
    Case("ip-block-cidr", [allow("ip", frm(Source(ip_blocks=("10.0.2.0/24",))))], conn(), True),
    Case("ip-block-single-ip", [allow("ip", frm(Source(ip_blocks=("10.0.2.5",))))], conn(), True),
    Case("ip-block-miss", [allow("ip", frm(Source(ip_blocks=("10.0.3.0/24",))))], conn(), False),
    Case(
        "ip-block-host-bits-ignored",
        [allow("ip", frm(Source(ip_blocks=("10.0.2.77/24",))))],
        conn(),
        True,
    ),
    Case(
        "not-ip-blocks", [allow("nip", frm(Source(not_ip_blocks=("10.0.2.0/24",))))], conn(), False
    ),
    Case(
        "ipv4-mapped-source-ip",
        [allow("ip", frm(Source(ip_blocks=("10.0.2.0/24",))))],
        conn(src_ip="::ffff:10.0.2.5"),
        True,
    ),
    Case(
        "ipv6-block",
        [allow("ip6", frm(Source(ip_blocks=("fd00::/64",))))],
        conn(src_ip="fd00::5"),
        True,
    ),
    Case(
        "ipv6-block-vs-ipv4-source",
        [allow("ip6", frm(Source(ip_blocks=("fd00::/64",))))],
        conn(),
        False,
    ),
    Case("ports-match", [allow("port", to(Operation(ports=(8080,))))], conn(port=8080), True),
    Case("ports-miss", [allow("port", to(Operation(ports=(8080,))))], conn(port=9090), False),
    Case("not-ports", [allow("np", to(Operation(not_ports=(9090,))))], conn(port=9090), False),
    Case("not-ports-other", [allow("np", to(Operation(not_ports=(9090,))))], conn(port=8080), True),
    Case(
        "deny-not-principals-star-denies-plaintext",
        [deny("require-mtls", frm(Source(not_principals=("*",))))],
        conn(None),
        False,
        "prod/require-mtls",
    ),
    Case(
        "deny-not-principals-star-lets-mtls-through",
        [deny("require-mtls", frm(Source(not_principals=("*",))))],
        conn(),
        True,
    ),
    Case(
        "not-principals-plaintext-matches",
        [allow("np", frm(Source(not_principals=("cluster.local/ns/shop/sa/cart",))))],
        conn(None),
        True,
    ),
    Case(
        "policy-in-other-namespace-ignored",
        [allow("elsewhere", frm(Source(principals=("nobody",))), ns="shop")],
        conn(),
        True,
    ),
    Case(
        "selector-not-matching-ignored",
        [allow("web-only", frm(Source(principals=("nobody",))), selector={"app": "web"})],
        conn(),
        True,
    ),
    Case(
        "selector-matching-applies",
        [allow("pay-only", frm(Source(principals=("nobody",))), selector={"app": "payments"})],
        conn(),
        False,
    ),
    Case(
        "root-namespace-allow-mesh-wide",
        [allow("mesh", frm(Source(principals=("nobody",))), ns=ROOT_NAMESPACE)],
        conn(),
        False,
    ),
    Case(
        "root-namespace-deny-mesh-wide",
        [deny("mesh-deny", frm(Source(namespaces=("shop",))), ns=ROOT_NAMESPACE)],
        conn(),
        False,
        f"{ROOT_NAMESPACE}/mesh-deny",
    ),
    Case(
        "root-namespace-selector",
        [deny("pay", Rule(), ns=ROOT_NAMESPACE, selector={"tier": "backend"})],
        conn(),
        False,
    ),
    Case(
        "sources-are-ored",
        [allow("or", frm(Source(principals=("x",)), Source(namespaces=("shop",))))],
        conn(),
        True,
    ),
    Case(
        "source-fields-are-anded",
        [allow("and", frm(Source(namespaces=("shop",), ip_blocks=("10.9.0.0/16",))))],
        conn(),
        False,
    ),
    Case(
        "rules-are-ored",
        [allow("rules", frm(Source(principals=("x",))), to(Operation(ports=(8080,))))],
        conn(),
        True,
    ),
    Case(
        "from-and-to-are-anded",
        [allow("ft", frm(Source(namespaces=("shop",)), to=(Operation(ports=(9999,)),)))],
        conn(),
        False,
    ),
    Case(
        "invalid-deny-fails-closed",
        [deny("broken", frm(Source(ip_blocks=("10.0.0.0/33",))))],
        conn(),
        False,
        "prod/broken",
        "invalid",
    ),
    Case(
        "invalid-allow-matches-nothing",
        [allow("broken", frm(Source(ip_blocks=("not-a-cidr",))))],
        conn(),
        False,
    ),
    Case(
        "prefix-principal",
        [allow("pfx", frm(Source(principals=("cluster.local/ns/shop/*",))))],
        conn(SHOP_OTHER),
        True,
    ),
    Case(
        "suffix-principal", [allow("sfx", frm(Source(principals=("*/sa/checkout",))))], conn(), True
    ),
    Case(
        "no-regex-in-principals",
        [allow("re", frm(Source(principals=("cluster.local/ns/shop/sa/check.*",))))],
        conn(),
        False,
    ),
    Case("other-trust-domain-does-not-match", [P_CHECKOUT], conn(FOREIGN), False),
    Case(
        "allow-and-deny-both-miss-denies",
        [P_CHECKOUT, deny("d", frm(Source(namespaces=("evil",))))],
        conn(SHOP_OTHER),
        False,
        reason="no ALLOW policy matched",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_authorize(case: Case) -> None:
    snap = build_snapshot(
        "node-a", [SERVER, *case.policies], epoch="e", version=1, trust_bundle=None
    )
    v = authorize(case.conn, snap)
    assert v.allowed is case.allowed, v
    if case.policy is not None:
        assert v.policy == case.policy
    if case.reason is not None:
        assert case.reason in v.reason


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 20


def test_unknown_destination_is_denied() -> None:
    snap = build_snapshot("node-a", [SERVER], epoch="e", version=1, trust_bundle=None)
    v = authorize(Connection("10.0.2.5", "10.0.1.99", 80, CHECKOUT), snap)
    assert not v.allowed and "not a known workload" in v.reason


def test_evaluate_is_order_independent() -> None:
    ps = [P_CHECKOUT, deny("d", frm(Source(namespaces=("shop",))))]
    assert evaluate(conn(), ps) == evaluate(conn(), list(reversed(ps)))


def test_verdict_json() -> None:
    assert Verdict(True, "ok", "a/b").to_json() == {
        "allowed": True,
        "reason": "ok",
        "policy": "a/b",
    }


def test_recheck_reports_connections_no_longer_allowed() -> None:
    store = StateStore("node-a")
    store.apply(WatchUpdate("e", 1, True, (SERVER,)))
    live = {
        "a": conn(),
        "b": conn(SHOP_OTHER),
        "c": conn(None),
        "gone": Connection("10.0.2.5", "10.0.1.99", 80, CHECKOUT),
    }
    assert all(authorize(c, store.current).allowed for k, c in live.items() if k != "gone")
    store.apply(WatchUpdate("e", 2, False, (P_CHECKOUT,)))
    bad = dict(recheck(store.current, live.items()))
    assert set(bad) == {"b", "c", "gone"}
    assert "left the mesh" in bad["gone"].reason
    # STRICT peer authentication also closes plaintext connections on recheck.
    store.apply(
        WatchUpdate(
            "e",
            3,
            False,
            (
                PeerAuthentication("strict", "prod", PeerAuthMode.STRICT),
                allow("all", Rule()),
            ),
        )
    )
    bad = dict(recheck(store.current, live.items()))
    assert set(bad) == {"c", "gone"}
    assert "STRICT" in bad["c"].reason
    assert not plaintext_verdict(store.current, SERVER).allowed
    assert effective_mode(store.current, SERVER) is PeerAuthMode.STRICT


def test_plaintext_verdict_default_permissive() -> None:
    snap = build_snapshot("node-a", [SERVER], epoch="e", version=1, trust_bundle=None)
    v = plaintext_verdict(snap, SERVER)
    assert v.allowed and "PERMISSIVE" in v.reason
