"""veilctl policies flags policies with L7 terms: where they are enforced and what a
ztunnel makes of them (ALLOW: matches nothing; DENY: denies on its L4 terms)."""

from __future__ import annotations

import pytest

from agent.cli.rows import policy_rows
from controller.api.model import (
    AuthorizationPolicy,
    Condition,
    Operation,
    PolicyAction,
    Rule,
    Source,
    TargetRef,
)
from ztunnel.admin.dump import policy_json

L4 = Rule(sources=(Source(principals=("cluster.local/ns/shop/sa/a",)),))
METHODS = Rule(operations=(Operation(methods=("GET",), paths=("/pay",)),))
CLAIM = Rule(conditions=(Condition("request.auth.claims[role]", ("admin",)),))
L4_WHEN = Rule(conditions=(Condition("source.namespace", ("shop",)),))


@pytest.mark.parametrize(
    ("action", "rules", "refs", "flag"),
    [
        (PolicyAction.ALLOW, (L4,), (), "-"),
        (PolicyAction.ALLOW, (L4_WHEN,), (), "-"),  # a ztunnel evaluates source.namespace
        (
            PolicyAction.ALLOW,
            (L4, METHODS),
            (),
            "L7 at ztunnel (methods,paths): matches nothing at L4",
        ),
        (
            PolicyAction.DENY,
            (CLAIM,),
            (),
            "L7 at ztunnel (when[request.auth.claims[role]]): denies on L4 terms",
        ),
        (
            PolicyAction.ALLOW,
            (METHODS,),
            (TargetRef("Service", "payments"),),
            "waypoint: Service/payments",
        ),
    ],
)
def test_l7_flag(
    action: PolicyAction, rules: tuple[Rule, ...], refs: tuple[TargetRef, ...], flag: str
) -> None:
    p = AuthorizationPolicy("p", "shop", action, rules=rules, target_refs=refs)
    (row,) = policy_rows([policy_json(p)])
    assert row["l7"] == flag


def test_rules_show_l7_fields() -> None:
    p = AuthorizationPolicy("p", "shop", PolicyAction.ALLOW, rules=(METHODS, CLAIM))
    (row,) = policy_rows([policy_json(p)])
    assert "to methods=GET paths=/pay" in row["rules"]
    assert "when request.auth.claims[role]=admin" in row["rules"]
