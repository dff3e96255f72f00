"""Istio-shaped AuthorizationPolicy and PeerAuthentication specs to model types.

Both registry sources (the YAML file and the Kubernetes API) hand the ``spec`` of
each object to :func:`parse_authorization_policy` or
:func:`parse_peer_authentication`, so the two sources accept and refuse exactly
the same documents. Veil enforces L4 policy only: the L7 fields of Istio's API
(methods, paths, request principals, ``when`` conditions) are refused with a
reason instead of being silently ignored, because ignoring a condition in an
ALLOW rule would allow more than the author meant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controller.api.model import (
    AuthorizationPolicy,
    Labels,
    Operation,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    Rule,
    Source,
)

from .fields import (
    Fields,
    check_cidr,
    check_namespace_pattern,
    check_port,
    check_principal,
    show,
)

__all__ = ["parse_authorization_policy", "parse_peer_authentication"]

_L7 = "Veil enforces L4 policy only (identities, namespaces, IP blocks and ports)"

_AUTHZ_SPEC_FIELDS = ("selector", "action", "rules")
_AUTHZ_SPEC_UNSUPPORTED = {
    "provider": "CUSTOM authorization providers are not supported; use ALLOW or DENY",
    "targetRef": "policy attachment by targetRef is not supported; use selector.matchLabels",
    "targetRefs": "policy attachment by targetRefs is not supported; use selector.matchLabels",
}
_RULE_FIELDS = ("from", "to")
_RULE_UNSUPPORTED = {"when": f"conditions are L7 or request attributes; {_L7}"}
_SOURCE_FIELDS = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
)
_SOURCE_UNSUPPORTED = {
    "requestPrincipals": f"request principals come from JWTs; {_L7}",
    "notRequestPrincipals": f"request principals come from JWTs; {_L7}",
    "remoteIpBlocks": "remote IP blocks come from X-Forwarded-For; use ipBlocks",
    "notRemoteIpBlocks": "remote IP blocks come from X-Forwarded-For; use notIpBlocks",
    "serviceAccounts": "use principals (<trust-domain>/ns/<namespace>/sa/<name>)",
    "notServiceAccounts": "use notPrincipals (<trust-domain>/ns/<namespace>/sa/<name>)",
}
_OPERATION_FIELDS = ("ports", "notPorts")
_OPERATION_UNSUPPORTED = {
    name: f"{name} is an HTTP attribute; {_L7}"
    for name in ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
}
_SELECTOR_FIELDS = ("matchLabels",)
_PEER_SPEC_FIELDS = ("selector", "mtls")
_PEER_SPEC_UNSUPPORTED = {
    "portLevelMtls": "per-port mTLS modes are not supported; set mtls.mode for the workload",
}


def _selector(spec: Fields) -> Labels | None:
    sel = spec.child(
        "selector",
        _SELECTOR_FIELDS,
        unsupported={"matchExpressions": "only matchLabels selectors are supported"},
    )
    if sel is None:
        return None
    return sel.labels("matchLabels")


def _source(raw: object, where: str, path: str) -> Source:
    wrapper = Fields(raw, where, ("source",), path=path)
    src = wrapper.child("source", _SOURCE_FIELDS, unsupported=_SOURCE_UNSUPPORTED)
    if src is None:
        wrapper.fail("source", "is required in each from[] entry")
    return Source(
        principals=src.values("principals", check_principal),
        not_principals=src.values("notPrincipals", check_principal),
        namespaces=src.values("namespaces", check_namespace_pattern),
        not_namespaces=src.values("notNamespaces", check_namespace_pattern),
        ip_blocks=src.values("ipBlocks", check_cidr),
        not_ip_blocks=src.values("notIpBlocks", check_cidr),
    )


def _operation(raw: object, where: str, path: str) -> Operation:
    wrapper = Fields(raw, where, ("operation",), path=path)
    op = wrapper.child("operation", _OPERATION_FIELDS, unsupported=_OPERATION_UNSUPPORTED)
    if op is None:
        wrapper.fail("operation", "is required in each to[] entry")
    return Operation(
        ports=op.values("ports", check_port), not_ports=op.values("notPorts", check_port)
    )


def _rule(raw: object, where: str, path: str) -> Rule:
    rule = Fields(raw, where, _RULE_FIELDS, path=path, unsupported=_RULE_UNSUPPORTED)
    return Rule(
        sources=tuple(_source(item, where, p) for p, item in rule.items("from")),
        operations=tuple(_operation(item, where, p) for p, item in rule.items("to")),
    )


def _action(spec: Fields) -> PolicyAction:
    raw = spec.raw("action")
    if raw is None:
        return PolicyAction.ALLOW  # Istio's default
    if raw in ("AUDIT", "CUSTOM"):
        spec.fail(
            "action",
            f"{raw} is not supported",
            "Veil enforces ALLOW and DENY only; AUDIT and CUSTOM need an L7 proxy",
        )
    if not isinstance(raw, str) or raw not in ("ALLOW", "DENY"):
        hint = "write ALLOW or DENY (upper case)"
        if isinstance(raw, str) and raw.upper() in ("ALLOW", "DENY"):
            hint = f"write {raw.upper()} (actions are upper case)"
        spec.fail("action", f"{show(raw)} is not a valid action", hint)
    return PolicyAction(raw)


def parse_authorization_policy(
    name: str, namespace: str, spec: Mapping[str, Any] | None, where: str
) -> AuthorizationPolicy:
    """An Istio ``security.istio.io`` AuthorizationPolicy spec as a model value.

    ``where`` names the object in error messages, e.g.
    ``authorizationPolicies[0] (shop/payments-from-checkout)``; field paths in
    errors start at ``spec``. A missing or empty spec is Istio's "allow nothing"
    (an ALLOW policy without rules), which denies every connection it selects.
    """
    fields = Fields(
        {} if spec is None else spec,
        where,
        _AUTHZ_SPEC_FIELDS,
        path="spec",
        unsupported=_AUTHZ_SPEC_UNSUPPORTED,
    )
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        action=_action(fields),
        rules=tuple(_rule(item, where, path) for path, item in fields.items("rules")),
        selector=_selector(fields),
    )


_MODES = {
    "UNSET": PeerAuthMode.UNSET,
    "PERMISSIVE": PeerAuthMode.PERMISSIVE,
    "STRICT": PeerAuthMode.STRICT,
}


def parse_peer_authentication(
    name: str, namespace: str, spec: Mapping[str, Any] | None, where: str
) -> PeerAuthentication:
    """An Istio PeerAuthentication spec (``selector``, ``mtls.mode``) as a model value.

    ``DISABLE`` is refused: an enrolled workload always speaks mTLS between
    nodes; PERMISSIVE is the mode that also accepts plaintext.
    """
    fields = Fields(
        {} if spec is None else spec,
        where,
        _PEER_SPEC_FIELDS,
        path="spec",
        unsupported=_PEER_SPEC_UNSUPPORTED,
    )
    mode = PeerAuthMode.UNSET
    mtls = fields.child("mtls", ("mode",))
    if mtls is not None and mtls.has("mode"):
        raw = mtls.raw("mode")
        if raw == "DISABLE":
            mtls.fail(
                "mode",
                "DISABLE is not supported",
                "enrolled workloads always use mTLS between nodes; use PERMISSIVE to also "
                "accept plaintext, or opt the pod out with veil.io/dataplane-mode: none",
            )
        if not isinstance(raw, str) or raw not in _MODES:
            mtls.fail(
                "mode", f"{show(raw)} is not a valid mode", "write STRICT, PERMISSIVE or UNSET"
            )
        mode = _MODES[raw]
    return PeerAuthentication(name=name, namespace=namespace, mode=mode, selector=_selector(fields))
