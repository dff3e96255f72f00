"""Istio-shaped AuthorizationPolicy / PeerAuthentication specs: accepted and refused."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api.model import (
    AuthorizationPolicy,
    Labels,
    Operation,
    PeerAuthMode,
    PolicyAction,
    Rule,
    Source,
)
from controller.registry import (
    RegistryError,
    parse_authorization_policy,
    parse_peer_authentication,
)

WHERE = "authorizationPolicies[0] (shop/p)"


def authz(spec: Any) -> AuthorizationPolicy:
    return parse_authorization_policy("p", "shop", spec, WHERE)


def test_payments_accepts_only_checkout() -> None:
    policy = authz(
        {
            "selector": {"matchLabels": {"app": "payments"}},
            "action": "ALLOW",
            "rules": [
                {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/checkout"]}}]}
            ],
        }
    )
    assert policy == AuthorizationPolicy(
        name="p",
        namespace="shop",
        action=PolicyAction.ALLOW,
        selector=Labels({"app": "payments"}),
        rules=(Rule(sources=(Source(principals=("cluster.local/ns/shop/sa/checkout",)),)),),
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # Missing spec: Istio's allow-nothing policy for the whole namespace.
        (None, AuthorizationPolicy("p", "shop", PolicyAction.ALLOW)),
        ({}, AuthorizationPolicy("p", "shop", PolicyAction.ALLOW)),
        # One empty rule: allow everything.
        ({"rules": [{}]}, AuthorizationPolicy("p", "shop", PolicyAction.ALLOW, rules=(Rule(),))),
        (
            {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080", 9090]}}]}]},
            AuthorizationPolicy(
                "p",
                "shop",
                PolicyAction.DENY,
                rules=(Rule(operations=(Operation(ports=(8080, 9090)),)),),
            ),
        ),
        (
            {"rules": [{"to": [{"operation": {"notPorts": [22]}}]}]},
            AuthorizationPolicy(
                "p",
                "shop",
                PolicyAction.ALLOW,
                rules=(Rule(operations=(Operation(not_ports=(22,)),)),),
            ),
        ),
        (
            {
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "principals": ["spiffe://cluster.local/ns/a/sa/b"],
                                    "notPrincipals": ["cluster.local/ns/a/sa/c"],
                                    "namespaces": ["a"],
                                    "notNamespaces": ["b"],
                                    "ipBlocks": ["10.1.2.3/24", "10.9.9.9"],
                                    "notIpBlocks": ["fd00::1/64"],
                                }
                            },
                            {"source": {"namespaces": ["c"]}},
                        ]
                    }
                ]
            },
            AuthorizationPolicy(
                "p",
                "shop",
                PolicyAction.ALLOW,
                rules=(
                    Rule(
                        sources=(
                            Source(
                                # Principals stay as written; the engine normalises.
                                principals=("spiffe://cluster.local/ns/a/sa/b",),
                                not_principals=("cluster.local/ns/a/sa/c",),
                                namespaces=("a",),
                                not_namespaces=("b",),
                                # Blocks are normalised: host bits cleared, bare IPs /32.
                                ip_blocks=("10.1.2.0/24", "10.9.9.9/32"),
                                not_ip_blocks=("fd00::/64",),
                            ),
                            Source(namespaces=("c",)),
                        ),
                    ),
                ),
            ),
        ),
        # An empty matchLabels is kept as an (empty) selector.
        ({"selector": {}}, AuthorizationPolicy("p", "shop", PolicyAction.ALLOW, selector=Labels())),
    ],
)
def test_accepted(spec: Any, expected: AuthorizationPolicy) -> None:
    assert authz(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"action": "AUDIT"}, 'field "spec.action": AUDIT is not supported'),
        ({"action": "CUSTOM"}, 'field "spec.action": CUSTOM is not supported'),
        ({"action": "allow"}, '"allow" is not a valid action'),
        ({"action": 1}, "1 (a number) is not a valid action"),
        ({"provider": {"name": "x"}}, 'field "spec.provider": is not supported'),
        ({"bogus": 1}, 'field "spec.bogus": unknown field'),
        ({"rules": {"from": []}}, 'field "spec.rules": expected a list'),
        (
            {"rules": [{"when": [{"key": "remote.ip", "values": ["1.2.3.4"]}]}]},
            'field "spec.rules[0].when[0].key": "remote.ip" is not supported',
        ),
        ({"rules": [{"from": [{}]}]}, 'field "spec.rules[0].from[0].source": is required'),
        (
            {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/*/sa/x"]}}]}]},
            'field "spec.rules[0].from[0].source.principals[0]": "cluster.local/ns/*/sa/x" is not '
            "a workload principal: '*' may only be the whole value or its first or last character",
        ),
        (
            {"rules": [{"from": [{"source": {"principals": ["Cluster Local/ns/a"]}}]}]},
            "is not a workload principal",
        ),
        (
            {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b?x"]}}]}]},
            "is not a workload principal",
        ),
        (
            {"rules": [{"from": [{"source": {"requestPrincipals": ["x"]}}]}]},
            'field "spec.rules[0].from[0].source.requestPrincipals[0]": "x" is not a request',
        ),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]},
            'field "spec.rules[0].from[0].source.ipBlocks[0]": "10.0.0.0/33" is not a CIDR',
        ),
        (
            {"rules": [{"from": [{"source": {"namespaces": ["sh*op"]}}]}]},
            'field "spec.rules[0].from[0].source.namespaces[0]": "sh*op": \'*\' may only be',
        ),
        (
            {"rules": [{"from": [{"source": {"namespaces": ["Shop"]}}]}]},
            "is not a valid DNS-1123 label",
        ),
        (
            {"rules": [{"to": [{"operation": {"methods": ["get"]}}]}]},
            'field "spec.rules[0].to[0].operation.methods[0]": "get" is not an HTTP method',
        ),
        (
            {"rules": [{"to": [{"operation": {"ports": [0]}}]}]},
            'field "spec.rules[0].to[0].operation.ports[0]": port 0 is out of range',
        ),
        ({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}, "expected a port number"),
        ({"rules": [{"to": [{"operation": {"ports": [True]}}]}]}, "expected a port number"),
        ({"selector": {"matchExpressions": []}}, "only matchLabels selectors"),
        ({"selector": {"matchLabels": {"app": 5}}}, 'field "spec.selector.matchLabels.app"'),
        ({"selector": {"matchLabels": {"bad key!": "x"}}}, "is not a valid label key"),
        ("ALLOW", "expected a mapping"),
    ],
)
def test_refused(spec: Any, message: str) -> None:
    with pytest.raises(RegistryError) as info:
        authz(spec)
    assert str(info.value).startswith(WHERE + ": ")
    assert message in str(info.value)


def test_unknown_field_lists_the_allowed_ones() -> None:
    with pytest.raises(RegistryError) as info:
        authz({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]})
    assert 'field "spec.rules[0].from[0].source.principal": unknown field' in str(info.value)
    assert info.value.hint is not None
    assert "principals, notPrincipals, namespaces" in info.value.hint


@pytest.mark.parametrize(
    ("spec", "mode", "selector"),
    [
        (None, PeerAuthMode.UNSET, None),
        ({"mtls": {"mode": "STRICT"}}, PeerAuthMode.STRICT, None),
        ({"mtls": {"mode": "PERMISSIVE"}}, PeerAuthMode.PERMISSIVE, None),
        ({"mtls": {}}, PeerAuthMode.UNSET, None),
        (
            {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "UNSET"}},
            PeerAuthMode.UNSET,
            Labels({"app": "db"}),
        ),
    ],
)
def test_peer_authentication(spec: Any, mode: PeerAuthMode, selector: Labels | None) -> None:
    pa = parse_peer_authentication("default", "shop", spec, "peerAuthentications[0]")
    assert (pa.name, pa.namespace, pa.mode, pa.selector) == ("default", "shop", mode, selector)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"mtls": {"mode": "DISABLE"}}, 'field "spec.mtls.mode": DISABLE is not supported'),
        ({"mtls": {"mode": "strict"}}, '"strict" is not a valid mode'),
        ({"portLevelMtls": {}}, 'field "spec.portLevelMtls": is not supported'),
        ({"mtls": "STRICT"}, 'field "spec.mtls": expected a mapping'),
    ],
)
def test_peer_authentication_refused(spec: Any, message: str) -> None:
    with pytest.raises(RegistryError, match=r"^peerAuthentications\[0\]: ") as info:
        parse_peer_authentication("default", "shop", spec, "peerAuthentications[0]")
    assert message in str(info.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "selector",
                    "matchLabels",
                    "action",
                    "rules",
                    "from",
                    "to",
                    "source",
                    "operation",
                    "principals",
                    "ports",
                    "ipBlocks",
                    "mtls",
                    "mode",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@given(_json)
def test_arbitrary_specs_fail_only_with_registry_error(spec: Any) -> None:
    # A spec comes from users or the Kubernetes API: any shape either parses or
    # raises RegistryError, never an unrelated exception.
    for parse in (parse_authorization_policy, parse_peer_authentication):
        try:
            parse("p", "shop", spec, WHERE)
        except RegistryError as e:
            assert str(e).startswith(WHERE)


def _from(field: str, value: str) -> dict[str, Any]:
    return {"rules": [{"from": [{"source": {field: [value]}}]}]}


PRINCIPAL_FIELD = 'field "spec.rules[0].from[0].source.{}[0]": '


@pytest.mark.parametrize("field", ["principals", "notPrincipals"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        # Not <td>/ns/<ns>/sa/<sa>: an ALLOW listing these would quietly match nobody.
        ("shop/checkout", "has 2 '/'-separated segments; a workload principal has 5"),
        ("cluster.local/ns/shop/checkout", "has 4 '/'-separated segments"),
        ("cluster.local/ns/shop/sa/checkout/x", "has 6 '/'-separated segments"),
        ("cluster.local/namespace/shop/sa/x", '"namespace" stands where "ns" belongs'),
        ("cluster.local/ns/shop/serviceaccount/x", '"serviceaccount" stands where "sa" belongs'),
        ("cluster.local/ns/Shop/sa/x", 'the namespace "Shop" has characters outside'),
        ("cluster.local/ns/shop/sa/-x", 'the service account "-x" is not a valid name'),
        ("cluster.local/veil/node/n1", "is a node identity"),
        ("spiffe://cluster.local/veil/node/n1", "is a node identity"),
        ("", "is empty"),
        ("spiffe://", "is empty"),
        # Wildcards: one '*', at either end, never in the middle or twice.
        ("cluster.local/ns/*/sa/x", "'*' may only be the whole value or its first or last"),
        ("*shop*", "'*' may only be"),
        ("**", "'*' may only be"),
        ("*/ns/shop/sa/x/y", "has 6 '/'-separated segments"),
        ("shop/checkout*", '"checkout" stands where "ns" belongs'),
        ("cluster.local/nx*", '"nx" stands where "ns" belongs'),
        ("*/sb/checkout", '"sb" stands where "sa" belongs'),
        ("*/Checkout", 'the service account "Checkout" has characters outside'),
    ],
)
def test_malformed_principals_are_refused_naming_the_field(
    field: str, value: str, problem: str
) -> None:
    with pytest.raises(RegistryError) as info:
        authz(_from(field, value))
    text = str(info.value)
    assert text.startswith(WHERE + ": " + PRINCIPAL_FIELD.format(field)), text
    assert problem in text, text
    assert info.value.field == f"spec.rules[0].from[0].source.{field}[0]"
    assert info.value.hint is not None and "<trust-domain>/ns/<namespace>/sa/" in info.value.hint


@pytest.mark.parametrize(
    "value",
    [
        "cluster.local/ns/shop/sa/checkout",
        "spiffe://cluster.local/ns/shop/sa/checkout",
        "example.org/ns/shop/sa/checkout",  # foreign trust domain: a warning, not an error
        "*",
        "spiffe://*",
        "cluster.local/*",
        "cluster.local/ns/shop/*",
        "cluster.local/ns/shop/sa/*",
        "cluster.local/ns/shop-*",
        "cluster.local/ns/shop/sa/check*",
        "cluster.local/n*",
        "*/ns/shop/sa/checkout",
        "*/sa/checkout",
        "*checkout",
        "*/checkout",
        "*op/sa/checkout",
    ],
)
def test_istio_principal_forms_are_accepted_as_written(value: str) -> None:
    for field in ("principals", "notPrincipals"):
        policy = authz(_from(field, value))
        (source,) = policy.rules[0].sources
        assert getattr(source, "principals" if field == "principals" else "not_principals") == (
            value,
        )


@pytest.mark.parametrize("value", ["*", "shop*", "*-prod", "shop-*", "a", "team-a"])
def test_istio_namespace_forms_are_accepted(value: str) -> None:
    (source,) = authz(_from("namespaces", value)).rules[0].sources
    assert source.namespaces == (value,)
    (source,) = authz(_from("notNamespaces", value)).rules[0].sources
    assert source.not_namespaces == (value,)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("sh*op", "'*' may only be the whole value or its first or last character"),
        ("*shop*", "'*' may only be"),
        ("**", "'*' may only be"),
        ("Shop*", "cannot match any namespace name"),
        ("-shop*", "cannot match any namespace name"),
        ("*shop-", "cannot match any namespace name"),
        ("sh_op*", "cannot match any namespace name"),
        ("Shop", "is not a valid DNS-1123 label"),
    ],
)
@pytest.mark.parametrize("field", ["namespaces", "notNamespaces"])
def test_malformed_namespace_patterns_are_refused_naming_the_field(
    field: str, value: str, problem: str
) -> None:
    with pytest.raises(RegistryError) as info:
        authz(_from(field, value))
    text = str(info.value)
    assert text.startswith(WHERE + ": " + PRINCIPAL_FIELD.format(field)), text
    assert problem in text, text
