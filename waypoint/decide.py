"""What to do with one HTTP request: the waypoint's pure decision.

:func:`decide` takes the destination the tunnel addressed, the request head
and who sent it, and returns a :class:`Forward` or a :class:`Respond` (400
bad path, 401 bad token, 403 denied, 503 nothing ready), naming the deciding
policy and the reason for the access log. Endpoint choice happens after it
(:mod:`.balance`); the IO happens in :mod:`.http1` / :mod:`.http2`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from node.policy import BadPath, RequestFacts, evaluate_request, normalize_target

from .authn import AuthnResult, KeysFor, www_authenticate
from .view import Destination

__all__ = ["Decision", "Forward", "PeerFacts", "Respond", "decide"]

FORBIDDEN_BODY = b"RBAC: access denied"


@dataclass(frozen=True, slots=True)
class PeerFacts:
    """Who opened the tunnel: the verified source identity and address."""

    principal: str | None  # scheme-less SPIFFE ID
    namespace: str | None
    ip: str | None


@dataclass(frozen=True, slots=True)
class Respond:
    status: int
    body: bytes
    reason: str
    policy: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    request_principal: str | None = None


@dataclass(frozen=True, slots=True)
class Forward:
    target: str  # the normalised request target sent upstream
    strip: tuple[str, ...]  # lower-case header names to drop (a consumed JWT)
    reason: str
    policy: str | None
    request_principal: str | None


Decision = Forward | Respond


def decide(
    dest: Destination,
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str],
    peer: PeerFacts,
    keys_for: KeysFor,
) -> Decision:
    """``headers``: lower-case names, repeated headers joined with ``,``."""
    try:
        normalized = normalize_target(target)
    except BadPath as e:
        return Respond(400, f"bad request path: {e.reason}\n".encode(), f"bad path: {e.reason}")
    authn: AuthnResult = dest.authn.authenticate(headers, keys_for)
    if authn.error is not None:
        return Respond(
            401,
            b"Jwt verification fails\n",
            f"invalid JWT: {authn.error}",
            headers=(("www-authenticate", www_authenticate(authn.error)),),
        )
    facts = RequestFacts(
        method=method,
        host=host,
        path=normalized.path,
        port=dest.port,
        headers=headers,
        source_principal=peer.principal,
        source_namespace=peer.namespace,
        source_ip=peer.ip,
        request_principal=authn.principal,
        claims=authn.claims,
        audiences=authn.audiences,
        presenter=authn.presenter,
    )
    verdict = evaluate_request(facts, dest.policies)
    if not verdict.allowed:
        return Respond(
            403, FORBIDDEN_BODY, verdict.reason, verdict.policy, request_principal=authn.principal
        )
    if not dest.endpoints:
        return Respond(
            503,
            b"no healthy upstream\n",
            f"no ready endpoint for {dest.key}",
            verdict.policy,
            request_principal=authn.principal,
        )
    return Forward(normalized.target, authn.strip, verdict.reason, verdict.policy, authn.principal)
