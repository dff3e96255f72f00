"""L7 AuthorizationPolicy fields, targetRefs and RequestAuthentication: accepted and refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from controller.api.model import (
    AuthorizationPolicy,
    Condition,
    JwtHeader,
    JwtRule,
    Operation,
    PolicyAction,
    RequestAuthentication,
    Rule,
    Source,
    TargetRef,
)
from controller.registry import (
    RegistryError,
    parse_authorization_policy,
    parse_registry,
    parse_request_authentication,
    registry_warnings,
)

WHERE = "authorizationPolicies[0] (shop/p)"
RA_WHERE = "requestAuthentications[0] (shop/jwt)"
EC_JWK = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
OKP_JWK = json.loads(OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate().public_key()))
JWKS = json.dumps({"keys": [EC_JWK, OKP_JWK]})


def authz(spec: Any) -> AuthorizationPolicy:
    return parse_authorization_policy("p", "shop", spec, WHERE)


def ra(spec: Any) -> RequestAuthentication:
    return parse_request_authentication("jwt", "shop", spec, RA_WHERE)


def rule(**fields: Any) -> dict[str, Any]:
    return {"rules": [fields]}


def test_the_payments_policy_of_the_docs() -> None:
    p = authz(
        {
            "targetRefs": [{"kind": "Service", "group": "", "name": "payments"}],
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/checkout"]}}],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/pay", "/pay/*"]}}],
                },
                {
                    "to": [{"operation": {"methods": ["POST", "DELETE"], "paths": ["/admin*"]}}],
                    "when": [{"key": "request.auth.claims[role]", "values": ["admin"]}],
                },
            ],
        }
    )
    assert p == AuthorizationPolicy(
        "p",
        "shop",
        PolicyAction.ALLOW,
        rules=(
            Rule(
                sources=(Source(principals=("cluster.local/ns/shop/sa/checkout",)),),
                operations=(Operation(methods=("GET",), paths=("/pay", "/pay/*")),),
            ),
            Rule(
                operations=(Operation(methods=("POST", "DELETE"), paths=("/admin*",)),),
                conditions=(Condition("request.auth.claims[role]", ("admin",)),),
            ),
        ),
        target_refs=(TargetRef("Service", "payments"),),
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            rule(to=[{"operation": {"hosts": ["*.shop", "Pay:80"], "notHosts": ["x"]}}]),
            Operation(hosts=("*.shop", "Pay:80"), not_hosts=("x",)),
        ),
        (
            rule(to=[{"operation": {"notMethods": ["DELETE", "P*"], "notPaths": ["*.php"]}}]),
            Operation(not_methods=("DELETE", "P*"), not_paths=("*.php",)),
        ),
        (
            rule(to=[{"operation": {"paths": ["*", "/", "/admin/", "/.well-known/*"]}}]),
            Operation(paths=("*", "/", "/admin/", "/.well-known/*")),
        ),
        (rule(to=[{"operation": {"ports": ["8080"]}}]), Operation(ports=(8080,))),
    ],
)
def test_operations_accepted(spec: Any, expected: Operation) -> None:
    assert authz(spec).rules[0].operations == (expected,)


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ({"key": "request.auth.claims[role]", "values": ["admin"]}, ("admin",)),
        ({"key": "request.auth.claims[org][team]", "values": ["pay*"]}, ("pay*",)),
        ({"key": "request.headers[x-user]", "notValues": ["bot"]}, ()),
        ({"key": "request.auth.principal", "values": ["https://idp/*"]}, ("https://idp/*",)),
        ({"key": "request.auth.audiences", "values": ["payments"]}, ("payments",)),
        ({"key": "request.auth.presenter", "values": ["web"]}, ("web",)),
        ({"key": "source.ip", "values": ["10.1.2.3/24"]}, ("10.1.2.0/24",)),
        ({"key": "source.namespace", "values": ["shop"]}, ("shop",)),
        ({"key": "source.principal", "values": ["cluster.local/ns/shop/sa/a"]}, None),
        ({"key": "destination.port", "values": [8080, "80"]}, ("8080", "80")),
    ],
)
def test_conditions_accepted(when: dict[str, Any], expected: tuple[str, ...] | None) -> None:
    (cond,) = authz(rule(when=[when])).rules[0].conditions
    assert cond.key == when["key"]
    if expected is not None:
        assert cond.values == expected


def test_request_principals_accepted() -> None:
    src = authz(
        rule(
            **{
                "from": [
                    {
                        "source": {
                            "requestPrincipals": ["https://idp.example/alice", "*"],
                            "notRequestPrincipals": ["https://evil/*"],
                        }
                    }
                ]
            }
        )
    ).rules[0]
    assert src.sources == (
        Source(
            request_principals=("https://idp.example/alice", "*"),
            not_request_principals=("https://evil/*",),
        ),
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (rule(to=[{"operation": {"paths": ["admin"]}}]), "\"admin\" does not start with '/'"),
        (rule(to=[{"operation": {"paths": ["//admin"]}}]), "is not a normalised path"),
        (rule(to=[{"operation": {"paths": ["/x/../admin"]}}]), "is not a normalised path"),
        (rule(to=[{"operation": {"paths": ["/./admin*"]}}]), "is not a normalised path"),
        (rule(to=[{"operation": {"paths": ["/%61dmin"]}}]), "write the decoded form"),
        (rule(to=[{"operation": {"paths": ["/a?x=1"]}}]), "without the query"),
        (rule(to=[{"operation": {"paths": ["/a/{*}/b"]}}]), "path templates"),
        (rule(to=[{"operation": {"paths": ["/a*b"]}}]), "'*' may only be"),
        (rule(to=[{"operation": {"paths": [7]}}]), "expected a string"),
        (
            rule(to=[{"operation": {"methods": ["GET", "delete"]}}]),
            'field "spec.rules[0].to[0].operation.methods[1]": "delete" is not an HTTP method',
        ),
        (rule(to=[{"operation": {"hosts": ["a b"]}}]), "whitespace"),
        (rule(to=[{"operation": {"hosts": ["a/b"]}}]), "is not a host name"),
        (rule(to=[{"operation": {"notPorts": [70000]}}]), "out of range"),
        (rule(to=[{"operation": {"verbs": ["GET"]}}]), "unknown field"),
        (
            rule(**{"from": [{"source": {"notRequestPrincipals": ["alice"]}}]}),
            'field "spec.rules[0].from[0].source.notRequestPrincipals[0]"',
        ),
        (
            rule(when=[{"key": "request.auth.claims[role]"}]),
            'field "spec.rules[0].when[0].values": condition request.auth.claims[role] needs',
        ),
        (rule(when=[{"key": "request.auth.claims", "values": ["x"]}]), "needs a name in brackets"),
        (rule(when=[{"key": "request.headers[a b]", "values": ["x"]}]), "needs a name"),
        (rule(when=[{"key": "request.method", "values": ["GET"]}]), "not a supported condition"),
        (rule(when=[{"key": "destination.ip", "values": ["1.2.3.4"]}]), "is not supported"),
        (rule(when=[{"key": "source.ip", "values": ["10.0.0.0/40"]}]), "is not a CIDR"),
        (rule(when=[{"key": "destination.port", "values": ["http"]}]), "expected a port"),
        (rule(when=[{"key": "source.namespace", "values": ["Shop"]}]), "DNS-1123"),
        (rule(when=[{"key": "source.principal", "values": ["bob"]}]), "not a workload principal"),
        (rule(when=[{"key": "request.headers[x]", "values": [1]}]), "expected a string"),
        (rule(when=[{"key": "x", "value": ["y"]}]), 'when[0].value": unknown field'),
        (
            {"targetRefs": [{"kind": "Pod", "name": "a"}]},
            'field "spec.targetRefs[0].kind": "Pod" is not a supported target kind',
        ),
        (
            {"targetRefs": [{"kind": "Gateway", "group": "apps", "name": "w"}]},
            'field "spec.targetRefs[0].group": "apps" is not the group of a Gateway',
        ),
        ({"targetRefs": [{"kind": "Service", "name": "Pay"}]}, "DNS-1035"),
        ({"targetRefs": [{"kind": "Service"}]}, 'targetRefs[0].name": is required'),
        (
            {"targetRefs": [{"kind": "Service", "name": "a", "namespace": "other"}]},
            "policy's own namespace",
        ),
        ({"targetRefs": []}, "must list at least one entry"),
        (
            {
                "selector": {"matchLabels": {"a": "b"}},
                "targetRefs": [{"kind": "Gateway", "name": "w"}],
            },
            "selector and targetRefs cannot both be set",
        ),
        ({"targetRef": {"kind": "Gateway", "name": "w"}}, "use targetRefs"),
    ],
)
def test_refused(spec: Any, message: str) -> None:
    with pytest.raises(RegistryError) as info:
        authz(spec)
    assert str(info.value).startswith(WHERE + ": ")
    assert message in str(info.value)


def test_gateway_and_core_groups() -> None:
    p = authz(
        {
            "targetRefs": [
                {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "shop-waypoint"},
                {"kind": "Service", "group": "core", "name": "payments"},
            ]
        }
    )
    assert p.target_refs == (
        TargetRef("Gateway", "shop-waypoint", "gateway.networking.k8s.io"),
        TargetRef("Service", "payments", ""),
    )


def test_request_authentication_accepted() -> None:
    a = ra(
        {
            "targetRefs": [{"kind": "Service", "name": "payments"}],
            "jwtRules": [
                {
                    "issuer": "https://idp.example",
                    "audiences": ["payments"],
                    "jwks": JWKS,
                    "fromHeaders": [{"name": "x-jwt", "prefix": "Token "}],
                    "forwardOriginalToken": True,
                },
                {"issuer": "other", "jwksUri": "https://idp.other/jwks.json"},
                {"issuer": "lab", "jwksUri": "http://127.0.0.1:8080/jwks"},
            ],
        }
    )
    assert a.target_refs == (TargetRef("Service", "payments"),)
    assert a.jwt_rules[0] == JwtRule(
        issuer="https://idp.example",
        audiences=("payments",),
        jwks=JWKS,
        from_headers=(JwtHeader("x-jwt", "Token "),),
        forward_original_token=True,
    )
    assert a.jwt_rules[1].jwks_uri == "https://idp.other/jwks.json"
    assert ra({"selector": {"matchLabels": {"app": "p"}}}).selector is not None
    assert ra(None) == RequestAuthentication("jwt", "shop")


@pytest.mark.parametrize(
    ("rule_", "message"),
    [
        ({"jwks": JWKS}, 'field "spec.jwtRules[0].issuer": is required'),
        ({"issuer": "a b", "jwks": JWKS}, "is not an issuer"),
        ({"issuer": "https://*", "jwks": JWKS}, "never a pattern"),
        ({"issuer": "i"}, 'field "spec.jwtRules[0].jwks": one of jwks'),
        ({"issuer": "i", "jwks": JWKS, "jwksUri": "https://x/j"}, "cannot both be set"),
        ({"issuer": "i", "jwks": "{not json"}, 'field "spec.jwtRules[0].jwks": is not JSON'),
        ({"issuer": "i", "jwks": '{"keys": []}'}, 'non-empty "keys" list'),
        ({"issuer": "i", "jwks": '{"keys": [{"kty": "oct", "k": "x"}]}'}, "is not supported"),
        ({"issuer": "i", "jwks": '{"keys": [{"kty": "EC", "crv": "P-256"}]}'}, "not a usable EC"),
        ({"issuer": "i", "jwksUri": "http://idp.example/jwks"}, "plain http"),
        ({"issuer": "i", "jwksUri": "ftp://idp/jwks"}, "is not an https URL"),
        ({"issuer": "i", "jwksUri": "https://x:99999/j"}, "is not a valid URL"),
        ({"issuer": "i", "jwks": JWKS, "fromHeaders": [{"name": "x y"}]}, "not an HTTP header"),
        ({"issuer": "i", "jwks": JWKS, "fromParams": ["t"]}, "tokens are read from headers"),
        ({"issuer": "i", "jwks": JWKS, "forwardOriginalToken": "yes"}, "expected true or false"),
        ({"issuer": "i", "jwks": JWKS, "audiences": [""]}, "is empty"),
    ],
)
def test_jwt_rule_refused(rule_: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistryError) as info:
        ra({"jwtRules": [rule_]})
    assert str(info.value).startswith(RA_WHERE + ": ")
    assert message in str(info.value)


def test_duplicate_issuer_refused() -> None:
    with pytest.raises(RegistryError, match=r"jwtRules\[1\].issuer.*already configured"):
        ra({"jwtRules": [{"issuer": "i", "jwks": JWKS}, {"issuer": "i", "jwks": JWKS}]})


DOC = """
namespaces:
  - {name: shop, labels: {veil.io/dataplane-mode: ambient, veil.io/use-waypoint: shop-waypoint}}
workloads:
  - {name: wp-0, namespace: shop, serviceAccount: shop-waypoint, node: wp-0,
     ips: [10.244.9.10], labels: {veil.io/waypoint: shop-waypoint}}
  - {name: payments-1, namespace: shop, serviceAccount: payments, node: node-b,
     ips: [10.244.2.10], labels: {app: payments}}
services:
  - {name: payments, namespace: shop, vips: [10.96.0.20], labels: {veil.io/use-waypoint: other},
     ports: [{port: 80, targetPort: 8080}], selector: {app: payments}}
requestAuthentications:
  - name: payments-jwt
    namespace: shop
    spec:
      targetRefs: [{kind: Service, name: payments}]
      jwtRules: [{issuer: "https://idp.example", jwksUri: "https://idp.example/jwks.json"}]
authorizationPolicies:
  - name: l4-with-l7
    namespace: shop
    spec:
      selector: {matchLabels: {app: payments}}
      rules: [{to: [{operation: {methods: [GET]}}]}]
"""


def test_registry_document_carries_the_waypoint_fields() -> None:
    state = parse_registry(DOC)
    assert state.namespaces[0].use_waypoint == "shop-waypoint"
    assert state.services[0].use_waypoint == "other"
    assert [w.waypoint for w in state.workloads] == ["", "shop-waypoint"]
    (auth,) = state.request_authentications
    assert auth.key == "shop/payments-jwt" and auth.jwt_rules[0].issuer == "https://idp.example"
    warnings = registry_warnings(state)
    assert any("l4-with-l7 has L7 terms but no targetRefs" in w for w in warnings)


def test_registry_document_names_the_request_authentication() -> None:
    doc = yaml.safe_load(DOC)
    doc["requestAuthentications"][0]["spec"]["jwtRules"][0]["jwksUri"] = "http://idp/j"
    with pytest.raises(RegistryError) as info:
        parse_registry(yaml.safe_dump(doc), source="registry.yaml")
    text = str(info.value)
    assert "registry.yaml" in text and "requestAuthentications[0] (shop/payments-jwt)" in text
    assert 'field "spec.jwtRules[0].jwksUri"' in text


def test_request_authentication_in_an_undeclared_namespace() -> None:
    doc = yaml.safe_load(DOC)
    doc["requestAuthentications"][0]["namespace"] = "nowhere"
    with pytest.raises(RegistryError, match="namespace 'nowhere' is not declared"):
        parse_registry(yaml.safe_dump(doc))
