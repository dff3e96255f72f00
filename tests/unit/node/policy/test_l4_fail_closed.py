"""A policy with L7 terms that reaches a ztunnel never allows (node.policy.match)."""

from __future__ import annotations

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
from controller.api.spiffe import SpiffeId
from node.policy import Connection, PolicySet, compile_policy, evaluate, l7_terms

SHOP = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/checkout")
PROD = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/batch")
CONN_SHOP = Connection("10.0.0.7", "10.0.1.20", 8080, SHOP)
CONN_PROD = Connection("10.0.0.8", "10.0.1.20", 8080, PROD)

FROM_SHOP = Source(namespaces=("shop",))
L7_RULES = {
    "methods": Rule(sources=(FROM_SHOP,), operations=(Operation(methods=("GET",)),)),
    "paths": Rule(sources=(FROM_SHOP,), operations=(Operation(paths=("/pay",)),)),
    "notPaths": Rule(sources=(FROM_SHOP,), operations=(Operation(not_paths=("/admin",)),)),
    "hosts": Rule(sources=(FROM_SHOP,), operations=(Operation(hosts=("x",)),)),
    "requestPrincipals": Rule(sources=(Source(namespaces=("shop",), request_principals=("*",)),)),
    "claims": Rule(
        sources=(FROM_SHOP,), conditions=(Condition("request.auth.claims[role]", ("a",)),)
    ),
    "headers": Rule(sources=(FROM_SHOP,), conditions=(Condition("request.headers[x]", ("a",)),)),
}


def _policy(action: PolicyAction, *rules: Rule) -> AuthorizationPolicy:
    return AuthorizationPolicy("p", "prod", action, rules=rules)


@pytest.mark.parametrize("term", sorted(L7_RULES))
def test_allow_with_l7_terms_matches_nothing(term: str) -> None:
    policy = _policy(PolicyAction.ALLOW, L7_RULES[term])
    assert l7_terms(L7_RULES[term])
    v = evaluate(CONN_SHOP, [policy])
    assert not v.allowed and v.reason == "no ALLOW policy matched"
    assert compile_policy(policy).l7_note is not None


@pytest.mark.parametrize("term", sorted(L7_RULES))
def test_deny_with_l7_terms_denies_on_its_l4_terms(term: str) -> None:
    policy = _policy(PolicyAction.DENY, L7_RULES[term])
    assert not evaluate(CONN_SHOP, [policy]).allowed  # from shop: denied whatever the L7 part
    assert evaluate(CONN_PROD, [policy]).allowed  # the L4 terms still decide


def test_l7_only_deny_denies_everyone() -> None:
    policy = _policy(PolicyAction.DENY, Rule(operations=(Operation(methods=("DELETE",)),)))
    assert not evaluate(CONN_PROD, [policy]).allowed
    assert not evaluate(Connection("10.0.0.9", "10.0.1.20", 8080, None), [policy]).allowed


def test_pure_l4_rule_beside_an_l7_rule_still_allows() -> None:
    policy = _policy(
        PolicyAction.ALLOW, L7_RULES["paths"], Rule(sources=(Source(namespaces=("prod",)),))
    )
    assert evaluate(CONN_PROD, [policy]).allowed
    assert not evaluate(CONN_SHOP, [policy]).allowed


@pytest.mark.parametrize(
    ("cond", "conn", "allowed"),
    [
        (Condition("source.namespace", ("shop",)), CONN_SHOP, True),
        (Condition("source.namespace", ("shop",)), CONN_PROD, False),
        (Condition("source.principal", ("cluster.local/ns/shop/*",)), CONN_SHOP, True),
        (Condition("destination.port", ("8080",)), CONN_SHOP, True),
        (Condition("destination.port", not_values=("8080",)), CONN_SHOP, False),
        (Condition("source.ip", ("10.0.0.7/32",)), CONN_SHOP, True),
        (Condition("source.ip", ("10.0.0.7/32",)), CONN_PROD, False),
    ],
)
def test_l4_conditions_are_evaluated(cond: Condition, conn: Connection, allowed: bool) -> None:
    rule = Rule(conditions=(cond,))
    assert not l7_terms(rule)
    assert evaluate(conn, [_policy(PolicyAction.ALLOW, rule)]).allowed is allowed


def test_attached_policies_are_not_enforced_by_a_ztunnel() -> None:
    deny_all = AuthorizationPolicy(
        "w", "prod", PolicyAction.DENY, rules=(Rule(),),
        target_refs=(TargetRef("Gateway", "prod-waypoint"),),
    )  # fmt: skip
    assert PolicySet.compile([deny_all]) == PolicySet()
    assert evaluate(CONN_SHOP, [deny_all]).allowed
