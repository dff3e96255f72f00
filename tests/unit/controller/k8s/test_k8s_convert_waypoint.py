"""Kubernetes objects for the waypoint: use-waypoint labels, L7 policies, RequestAuthentication."""

from __future__ import annotations

from typing import Any

from controller.api.model import TargetRef
from controller.k8s.convert import convert
from controller.k8s.kinds import (
    AUTHORIZATION_POLICIES,
    REQUEST_AUTHENTICATIONS,
    REQUIRED_KINDS,
    WATCHED_KINDS,
)

Obj = dict[str, Any]
WP = {"veil.io/use-waypoint": "shop-waypoint"}


def obj(name: str, spec: Any, namespace: str = "shop", rv: str = "1") -> Obj:
    meta = {"name": name, "namespace": namespace, "generation": 2, "resourceVersion": rv}
    return {"metadata": meta, "spec": spec}


def namespace(labels: dict[str, str]) -> Obj:
    return {"metadata": {"name": "shop", "labels": {"veil.io/dataplane-mode": "ambient", **labels}}}


def service(labels: dict[str, str]) -> Obj:
    return {
        "metadata": {"name": "payments", "namespace": "shop", "labels": labels},
        "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080}]},
    }


def test_use_waypoint_labels_flow_into_the_model() -> None:
    conv = convert("cluster.local", namespaces=[namespace(WP)], pods=[], services=[service(WP)])
    assert conv.state.namespaces[0].use_waypoint == "shop-waypoint"
    assert conv.state.services[0].use_waypoint == "shop-waypoint"
    plain = convert("cluster.local", namespaces=[namespace({})], pods=[], services=[service({})])
    assert plain.state.namespaces[0].use_waypoint == ""
    assert plain.state.services[0].use_waypoint == ""


def test_l7_policy_and_request_authentication_are_converted() -> None:
    l7 = obj(
        "payments-l7",
        {
            "targetRefs": [{"kind": "Service", "group": "", "name": "payments"}],
            "rules": [
                {
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/pay"]}}],
                    "when": [{"key": "request.auth.claims[role]", "values": ["admin"]}],
                }
            ],
        },
    )
    ra = obj(
        "payments-jwt",
        {
            "targetRefs": [{"kind": "Service", "name": "payments"}],
            "jwtRules": [{"issuer": "https://idp.example", "jwksUri": "https://idp/j.json"}],
        },
    )
    bad_ra = obj("bad-jwt", {"jwtRules": [{"issuer": "x", "jwksUri": "http://idp/j"}]})
    conv = convert(
        "cluster.local",
        namespaces=[namespace(WP)],
        pods=[],
        authorization_policies=[l7],
        request_authentications=[ra, bad_ra],
    )
    (policy,) = conv.state.authorization_policies
    assert policy.target_refs == (TargetRef("Service", "payments"),)
    assert policy.rules[0].operations[0].paths == ("/pay",)
    (auth,) = conv.state.request_authentications
    assert auth.key == "shop/payments-jwt"
    verdicts = {(v.kind, v.name): v for v in conv.verdicts}
    assert verdicts[(AUTHORIZATION_POLICIES, "payments-l7")].accepted
    assert verdicts[(REQUEST_AUTHENTICATIONS, "payments-jwt")].accepted
    bad = verdicts[(REQUEST_AUTHENTICATIONS, "bad-jwt")]
    assert not bad.accepted and bad.generation == 2
    assert 'RequestAuthentication shop/bad-jwt: field "spec.jwtRules[0].jwksUri"' in (
        bad.error or ""
    )


def test_request_authentications_are_watched_and_required() -> None:
    # Without them a DENY on a claim would stop matching: the controller waits.
    assert REQUEST_AUTHENTICATIONS in WATCHED_KINDS
    assert REQUEST_AUTHENTICATIONS in REQUIRED_KINDS
    assert REQUEST_AUTHENTICATIONS.collection_path("shop") == (
        "/apis/security.veil.io/v1/namespaces/shop/requestauthentications"
    )
