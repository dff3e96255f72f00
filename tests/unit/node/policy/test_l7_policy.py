"""Table tests of L7 request authorization (node.policy.l7)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.api.model import (
    AuthorizationPolicy,
    Condition,
    Operation,
    PolicyAction,
    Rule,
    Source,
    TargetRef,
)
from node.policy import L7PolicySet, RequestFacts, attached_to, evaluate_request

ALLOW, DENY = PolicyAction.ALLOW, PolicyAction.DENY
CHECKOUT = "cluster.local/ns/shop/sa/checkout"
ADMIN_CLAIMS = {"role": "admin", "groups": ["ops", "dev"], "org": {"team": {"name": "pay"}}}

BASE = RequestFacts(
    method="GET",
    host="payments.shop.svc:8080",
    path="/pay",
    port=8080,
    headers={"x-user": "alice", "user-agent": "curl/8"},
    source_principal=CHECKOUT,
    source_namespace="shop",
    source_ip="10.0.0.7",
)
JWT = replace(
    BASE,
    request_principal="https://idp.example/alice",
    claims=ADMIN_CLAIMS,
    audiences=("payments", "other"),
)


def pol(action: PolicyAction, *rules: Rule, name: str = "p") -> AuthorizationPolicy:
    return AuthorizationPolicy(name, "shop", action, rules=rules)


def to(**kw: tuple[str, ...] | tuple[int, ...]) -> Rule:
    return Rule(operations=(Operation(**kw),))  # type: ignore[arg-type]


def when(key: str, values: tuple[str, ...] = (), not_values: tuple[str, ...] = ()) -> Rule:
    return Rule(conditions=(Condition(key, values, not_values),))


# (name, rule, request, matches)
MATCH_CASES = [
    ("empty rule matches all", Rule(), BASE, True),
    ("method exact", to(methods=("GET",)), BASE, True),
    ("method other", to(methods=("DELETE",)), BASE, False),
    ("method is case-sensitive", to(methods=("get",)), BASE, False),
    ("notMethods", to(not_methods=("DELETE",)), BASE, True),
    ("notMethods hit", to(not_methods=("GET",)), BASE, False),
    ("path exact", to(paths=("/pay",)), BASE, True),
    ("path prefix", to(paths=("/pa*",)), BASE, True),
    ("path suffix", to(paths=("*ay",)), BASE, True),
    ("path star", to(paths=("*",)), BASE, True),
    (
        "path exact miss with trailing slash",
        to(paths=("/pay",)),
        replace(BASE, path="/pay/"),
        False,
    ),
    ("notPaths", to(not_paths=("/admin*",)), BASE, True),
    ("host without port ignores port", to(hosts=("payments.shop.svc",)), BASE, True),
    ("host is case-insensitive", to(hosts=("Payments.Shop.SVC",)), BASE, True),
    ("host with port", to(hosts=("payments.shop.svc:8080",)), BASE, True),
    ("host with other port", to(hosts=("payments.shop.svc:9090",)), BASE, False),
    ("host suffix", to(hosts=("*.svc",)), BASE, True),
    ("notHosts", to(not_hosts=("*.svc",)), BASE, False),
    ("ports", to(ports=(8080,)), BASE, True),
    ("notPorts", to(not_ports=(8080,)), BASE, False),
    ("AND within an operation", to(methods=("GET",), paths=("/admin",)), BASE, False),
    (
        "OR across operations",
        Rule(operations=(Operation(paths=("/x",)), Operation(methods=("GET",)))),
        BASE,
        True,
    ),
    ("principal", Rule(sources=(Source(principals=(CHECKOUT,)),)), BASE, True),
    (
        "principal with scheme",
        Rule(sources=(Source(principals=("spiffe://" + CHECKOUT,)),)),
        BASE,
        True,
    ),
    ("namespaces", Rule(sources=(Source(namespaces=("prod",)),)), BASE, False),
    ("ipBlocks", Rule(sources=(Source(ip_blocks=("10.0.0.0/24",)),)), BASE, True),
    (
        "requestPrincipals need a JWT",
        Rule(sources=(Source(request_principals=("*",)),)),
        BASE,
        False,
    ),
    ("requestPrincipals *", Rule(sources=(Source(request_principals=("*",)),)), JWT, True),
    (
        "requestPrincipals exact",
        Rule(sources=(Source(request_principals=("https://idp.example/alice",)),)),
        JWT,
        True,
    ),
    (
        "notRequestPrincipals * without JWT",
        Rule(sources=(Source(not_request_principals=("*",)),)),
        BASE,
        True,
    ),
    (
        "notRequestPrincipals * with JWT",
        Rule(sources=(Source(not_request_principals=("*",)),)),
        JWT,
        False,
    ),
    ("claim", when("request.auth.claims[role]", ("admin",)), JWT, True),
    ("claim other value", when("request.auth.claims[role]", ("user",)), JWT, False),
    ("claim without JWT", when("request.auth.claims[role]", ("admin",)), BASE, False),
    (
        "claim notValues without JWT",
        when("request.auth.claims[role]", not_values=("admin",)),
        BASE,
        True,
    ),
    ("list claim any element", when("request.auth.claims[groups]", ("dev",)), JWT, True),
    ("list claim none", when("request.auth.claims[groups]", ("qa",)), JWT, False),
    ("nested claim", when("request.auth.claims[org][team][name]", ("pay",)), JWT, True),
    ("nested claim missing", when("request.auth.claims[org][x][name]", ("pay",)), JWT, False),
    ("claim prefix", when("request.auth.claims[role]", ("adm*",)), JWT, True),
    ("principal condition", when("request.auth.principal", ("https://idp.example/*",)), JWT, True),
    ("audiences", when("request.auth.audiences", ("payments",)), JWT, True),
    ("audiences miss", when("request.auth.audiences", ("billing",)), JWT, False),
    ("header", when("request.headers[X-User]", ("alice",)), BASE, True),
    ("header notValues", when("request.headers[x-user]", not_values=("alice",)), BASE, False),
    ("header absent", when("request.headers[x-none]", ("*",)), BASE, False),
    ("source.principal", when("source.principal", ("spiffe://" + CHECKOUT,)), BASE, True),
    ("source.namespace", when("source.namespace", ("shop",)), BASE, True),
    ("source.ip", when("source.ip", ("10.0.0.0/8",)), BASE, True),
    ("source.ip not", when("source.ip", not_values=("10.0.0.7",)), BASE, False),
    ("destination.port", when("destination.port", ("8080",)), BASE, True),
    (
        "conditions are ANDed",
        Rule(
            conditions=(
                Condition("source.namespace", ("shop",)),
                Condition("destination.port", ("1",)),
            )
        ),
        BASE,
        False,
    ),
]


@pytest.mark.parametrize(
    ("rule", "request_", "matches"),
    [c[1:] for c in MATCH_CASES],
    ids=[c[0] for c in MATCH_CASES],
)
def test_rule_matching(rule: Rule, request_: RequestFacts, matches: bool) -> None:
    allow = evaluate_request(request_, L7PolicySet.compile([pol(ALLOW, rule)]))
    deny = evaluate_request(request_, L7PolicySet.compile([pol(DENY, rule)]))
    assert allow.allowed is matches
    assert deny.allowed is not matches


PAY_GET = pol(
    ALLOW,
    Rule(
        sources=(Source(principals=(CHECKOUT,)),),
        operations=(Operation(methods=("GET",), paths=("/pay",)),),
    ),
    name="checkout-get-pay",
)
ADMIN = pol(
    ALLOW,
    Rule(
        operations=(Operation(paths=("/admin*",)),),
        conditions=(Condition("request.auth.claims[role]", ("admin",)),),
    ),
    name="admin-with-role",
)
NO_DELETE = pol(DENY, to(methods=("DELETE",), paths=("/pay",)), name="no-delete")


@pytest.mark.parametrize(
    ("policies", "request_", "allowed", "policy", "reason"),
    [
        ([], BASE, True, None, "no ALLOW policy applies"),
        ([PAY_GET, ADMIN, NO_DELETE], BASE, True, "shop/checkout-get-pay", "allowed by ALLOW"),
        (
            [PAY_GET, ADMIN, NO_DELETE],
            replace(BASE, method="DELETE"),
            False,
            "shop/no-delete",
            "denied by DENY",
        ),
        ([PAY_GET, ADMIN], replace(BASE, method="POST"), False, None, "no ALLOW policy matched"),
        (
            [PAY_GET, ADMIN],
            replace(JWT, method="POST", path="/admin"),
            True,
            "shop/admin-with-role",
            "allowed",
        ),
        ([PAY_GET, ADMIN], replace(BASE, method="POST", path="/admin"), False, None, "no ALLOW"),
        ([NO_DELETE], replace(BASE, method="POST"), True, None, "no ALLOW policy applies"),
    ],
)
def test_evaluation_order(
    policies: list[AuthorizationPolicy],
    request_: RequestFacts,
    allowed: bool,
    policy: str | None,
    reason: str,
) -> None:
    v = evaluate_request(request_, L7PolicySet.compile(policies))
    assert (v.allowed, v.policy) == (allowed, policy)
    assert reason in v.reason


@pytest.mark.parametrize(
    "cond",
    [
        Condition("request.unknown", ("x",)),
        Condition("request.auth.claims[]", ("x",)),
        Condition("request.auth.claims[role]"),  # neither values nor notValues
        Condition("source.ip", ("not-an-ip",)),
    ],
)
def test_invalid_policies_fail_closed(cond: Condition) -> None:
    rule = Rule(conditions=(cond,))
    deny = evaluate_request(BASE, L7PolicySet.compile([pol(DENY, rule)]))
    assert not deny.allowed and "invalid" in deny.reason
    allow = evaluate_request(BASE, L7PolicySet.compile([pol(ALLOW, rule)]))
    assert not allow.allowed


def test_attachment() -> None:
    refs = (TargetRef("Gateway", "shop-waypoint"), TargetRef("Service", "payments"))
    kw = {"policy_namespace": "shop", "namespace": "shop"}
    assert attached_to(refs, waypoint="shop-waypoint", **kw)
    assert attached_to(refs[1:], waypoint="w", service="payments", **kw)
    assert not attached_to(refs[1:], waypoint="w", service="cart", **kw)
    assert not attached_to(
        refs, policy_namespace="prod", namespace="shop", waypoint="shop-waypoint"
    )
    assert not attached_to((), waypoint="shop-waypoint", **kw)
