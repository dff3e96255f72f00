"""Istio-shaped AuthorizationPolicy, PeerAuthentication and RequestAuthentication specs.

Both registry sources (the YAML file and the Kubernetes API) hand the ``spec`` of
each object to :func:`parse_authorization_policy`,
:func:`parse_peer_authentication` or :func:`parse_request_authentication`, so
the two sources accept and refuse exactly the same documents. The L7 fields
(methods, paths, hosts, request principals, ``when`` conditions,
``targetRefs``, ``jwtRules``) are validated in :mod:`.l7`; the waypoint
enforces them, and a ztunnel that receives a policy with L7 terms fails closed
(docs/waypoint.md). Fields Veil does not implement are refused with a reason
instead of being silently ignored, because ignoring a condition in an ALLOW
rule would allow more than the author meant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controller.api.model import (
    AuthorizationPolicy,
    Labels,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    RequestAuthentication,
    Rule,
    Source,
)

from .fields import (
    Fields,
    check_cidr,
    check_namespace_pattern,
    check_principal,
    show,
)
from .l7 import (
    check_request_principal,
    parse_condition,
    parse_operation,
    parse_target_refs,
)
from .l7 import parse_request_authentication as _parse_request_authentication

__all__ = [
    "parse_authorization_policy",
    "parse_peer_authentication",
    "parse_request_authentication",
]

_AUTHZ_SPEC_FIELDS = ("selector", "targetRefs", "action", "rules")
_AUTHZ_SPEC_UNSUPPORTED = {
    "provider": "CUSTOM authorization providers are not supported; use ALLOW or DENY",
    "targetRef": "use targetRefs (a list)",
}
_RULE_FIELDS = ("from", "to", "when")
_SOURCE_FIELDS = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "requestPrincipals",
    "notRequestPrincipals",
)
_SOURCE_UNSUPPORTED = {
    "remoteIpBlocks": "remote IP blocks come from X-Forwarded-For; use ipBlocks",
    "notRemoteIpBlocks": "remote IP blocks come from X-Forwarded-For; use notIpBlocks",
    "serviceAccounts": "use principals (<trust-domain>/ns/<namespace>/sa/<name>)",
    "notServiceAccounts": "use notPrincipals (<trust-domain>/ns/<namespace>/sa/<name>)",
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
        request_principals=src.values("requestPrincipals", check_request_principal),
        not_request_principals=src.values("notRequestPrincipals", check_request_principal),
    )


def _rule(raw: object, where: str, path: str) -> Rule:
    rule = Fields(raw, where, _RULE_FIELDS, path=path)
    return Rule(
        sources=tuple(_source(item, where, p) for p, item in rule.items("from")),
        operations=tuple(parse_operation(item, where, p) for p, item in rule.items("to")),
        conditions=tuple(parse_condition(item, where, p) for p, item in rule.items("when")),
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
    selector = _selector(fields)
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        action=_action(fields),
        rules=tuple(_rule(item, where, path) for path, item in fields.items("rules")),
        selector=selector,
        target_refs=parse_target_refs(fields, selector),
    )


def parse_request_authentication(
    name: str, namespace: str, spec: Mapping[str, Any] | None, where: str
) -> RequestAuthentication:
    """An Istio RequestAuthentication spec (``selector`` or ``targetRefs``, ``jwtRules``).

    Validation of the rules is in :mod:`.l7`; see docs/waypoint.md for where it
    applies.
    """
    return _parse_request_authentication(name, namespace, spec, where, _selector)


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
