"""Conversion between protobuf messages and the frozen model types.

This module, :mod:`controller.api.client` and :mod:`controller.service` are
the only places that touch generated ``_pb2`` code. Everything else in Veil
works with :mod:`controller.api.model`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from . import veil_pb2 as pb
from .model import (
    AuthorizationPolicy,
    Condition,
    JwtHeader,
    JwtRule,
    Labels,
    Namespace,
    Operation,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    RequestAuthentication,
    Resource,
    ResourceType,
    Rule,
    Service,
    ServicePort,
    Source,
    TargetRef,
    TrustBundle,
    WatchUpdate,
    Workload,
)
from .spiffe import InvalidSpiffeId

__all__ = [
    "resource_from_pb",
    "resource_to_pb",
    "trust_bundle_from_pb",
    "trust_bundle_to_pb",
    "watch_response_to_pb",
    "watch_update_from_bytes",
    "watch_update_from_pb",
    "watch_update_to_bytes",
]

log = logging.getLogger("veil.api.wire")

_MODE_TO_PB = {
    PeerAuthMode.UNSET: pb.UNSET,
    PeerAuthMode.PERMISSIVE: pb.PERMISSIVE,
    PeerAuthMode.STRICT: pb.STRICT,
}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}
_ACTION_TO_PB = {PolicyAction.ALLOW: pb.ALLOW, PolicyAction.DENY: pb.DENY}
_ACTION_FROM_PB = {v: k for k, v in _ACTION_TO_PB.items()}


def _source_to_pb(s: Source) -> pb.Source:
    return pb.Source(
        principals=s.principals,
        not_principals=s.not_principals,
        namespaces=s.namespaces,
        not_namespaces=s.not_namespaces,
        ip_blocks=s.ip_blocks,
        not_ip_blocks=s.not_ip_blocks,
        request_principals=s.request_principals,
        not_request_principals=s.not_request_principals,
    )


def _source_from_pb(m: pb.Source) -> Source:
    return Source(
        principals=tuple(m.principals),
        not_principals=tuple(m.not_principals),
        namespaces=tuple(m.namespaces),
        not_namespaces=tuple(m.not_namespaces),
        ip_blocks=tuple(m.ip_blocks),
        not_ip_blocks=tuple(m.not_ip_blocks),
        request_principals=tuple(m.request_principals),
        not_request_principals=tuple(m.not_request_principals),
    )


def _operation_to_pb(o: Operation) -> pb.Operation:
    return pb.Operation(
        ports=o.ports,
        not_ports=o.not_ports,
        hosts=o.hosts,
        not_hosts=o.not_hosts,
        methods=o.methods,
        not_methods=o.not_methods,
        paths=o.paths,
        not_paths=o.not_paths,
    )


def _operation_from_pb(m: pb.Operation) -> Operation:
    return Operation(
        ports=tuple(m.ports),
        not_ports=tuple(m.not_ports),
        hosts=tuple(m.hosts),
        not_hosts=tuple(m.not_hosts),
        methods=tuple(m.methods),
        not_methods=tuple(m.not_methods),
        paths=tuple(m.paths),
        not_paths=tuple(m.not_paths),
    )


def _rule_to_pb(rule: Rule) -> pb.Rule:
    return pb.Rule(
        **{"from": [_source_to_pb(s) for s in rule.sources]},
        to=[_operation_to_pb(o) for o in rule.operations],
        when=[
            pb.Condition(key=c.key, values=c.values, not_values=c.not_values)
            for c in rule.conditions
        ],
    )


def _rule_from_pb(m: pb.Rule) -> Rule:
    return Rule(
        sources=tuple(_source_from_pb(s) for s in getattr(m, "from")),
        operations=tuple(_operation_from_pb(o) for o in m.to),
        conditions=tuple(
            Condition(key=c.key, values=tuple(c.values), not_values=tuple(c.not_values))
            for c in m.when
        ),
    )


def _refs_to_pb(refs: tuple[TargetRef, ...]) -> list[pb.TargetRef]:
    return [pb.TargetRef(kind=r.kind, name=r.name, group=r.group) for r in refs]


def _refs_from_pb(refs: Iterable[pb.TargetRef]) -> tuple[TargetRef, ...]:
    return tuple(TargetRef(kind=r.kind, name=r.name, group=r.group) for r in refs)


def _jwt_rule_to_pb(j: JwtRule) -> pb.JwtRule:
    return pb.JwtRule(
        issuer=j.issuer,
        audiences=j.audiences,
        jwks=j.jwks,
        jwks_uri=j.jwks_uri,
        from_headers=[pb.JwtHeader(name=h.name, prefix=h.prefix) for h in j.from_headers],
        forward_original_token=j.forward_original_token,
    )


def _jwt_rule_from_pb(m: pb.JwtRule) -> JwtRule:
    return JwtRule(
        issuer=m.issuer,
        audiences=tuple(m.audiences),
        jwks=m.jwks,
        jwks_uri=m.jwks_uri,
        from_headers=tuple(JwtHeader(name=h.name, prefix=h.prefix) for h in m.from_headers),
        forward_original_token=m.forward_original_token,
    )


def resource_to_pb(r: Resource) -> pb.Resource:
    if isinstance(r, Namespace):
        return pb.Resource(namespace=pb.Namespace(name=r.name, labels=dict(r.labels)))
    if isinstance(r, Workload):
        return pb.Resource(
            workload=pb.Workload(
                name=r.name,
                namespace=r.namespace,
                service_account=r.service_account,
                node=r.node,
                ips=r.ips,
                labels=dict(r.labels),
                enrolled=r.enrolled,
                ready=r.ready,
                trust_domain=r.trust_domain,
            )
        )
    if isinstance(r, Service):
        return pb.Resource(
            service=pb.Service(
                name=r.name,
                namespace=r.namespace,
                vips=r.vips,
                ports=[
                    pb.ServicePort(name=p.name, port=p.port, target_port=p.target_port)
                    for p in r.ports
                ],
                selector=dict(r.selector),
                endpoints=r.endpoints,
                use_waypoint=r.use_waypoint,
                use_waypoint_namespace=r.use_waypoint_namespace,
            )
        )
    if isinstance(r, AuthorizationPolicy):
        return pb.Resource(
            authorization_policy=pb.AuthorizationPolicy(
                name=r.name,
                namespace=r.namespace,
                has_selector=r.selector is not None,
                selector=dict(r.selector or {}),
                action=_ACTION_TO_PB[r.action],
                rules=[_rule_to_pb(rule) for rule in r.rules],
                target_refs=_refs_to_pb(r.target_refs),
            )
        )
    if isinstance(r, PeerAuthentication):
        return pb.Resource(
            peer_authentication=pb.PeerAuthentication(
                name=r.name,
                namespace=r.namespace,
                has_selector=r.selector is not None,
                selector=dict(r.selector or {}),
                mode=_MODE_TO_PB[r.mode],
            )
        )
    if isinstance(r, RequestAuthentication):
        return pb.Resource(
            request_authentication=pb.RequestAuthentication(
                name=r.name,
                namespace=r.namespace,
                has_selector=r.selector is not None,
                selector=dict(r.selector or {}),
                target_refs=_refs_to_pb(r.target_refs),
                jwt_rules=[_jwt_rule_to_pb(j) for j in r.jwt_rules],
            )
        )
    raise TypeError(f"not a Veil resource: {type(r).__name__}")


def resource_from_pb(m: pb.Resource) -> Resource:
    kind = m.WhichOneof("kind")
    if kind == "namespace":
        n = m.namespace
        return Namespace(name=n.name, labels=Labels(dict(n.labels)))
    if kind == "workload":
        w = m.workload
        return Workload(
            name=w.name,
            namespace=w.namespace,
            service_account=w.service_account,
            node=w.node,
            ips=tuple(w.ips),
            labels=Labels(dict(w.labels)),
            enrolled=w.enrolled,
            ready=w.ready,
            trust_domain=w.trust_domain,
        )
    if kind == "service":
        s = m.service
        return Service(
            name=s.name,
            namespace=s.namespace,
            vips=tuple(s.vips),
            ports=tuple(
                ServicePort(port=p.port, target_port=p.target_port, name=p.name) for p in s.ports
            ),
            selector=Labels(dict(s.selector)),
            endpoints=tuple(s.endpoints),
            use_waypoint=s.use_waypoint,
            use_waypoint_namespace=s.use_waypoint_namespace,
        )
    if kind == "authorization_policy":
        p = m.authorization_policy
        return AuthorizationPolicy(
            name=p.name,
            namespace=p.namespace,
            action=_ACTION_FROM_PB[p.action],
            selector=Labels(dict(p.selector)) if p.has_selector else None,
            rules=tuple(_rule_from_pb(rule) for rule in p.rules),
            target_refs=_refs_from_pb(p.target_refs),
        )
    if kind == "peer_authentication":
        a = m.peer_authentication
        return PeerAuthentication(
            name=a.name,
            namespace=a.namespace,
            mode=_MODE_FROM_PB[a.mode],
            selector=Labels(dict(a.selector)) if a.has_selector else None,
        )
    if kind == "request_authentication":
        q = m.request_authentication
        return RequestAuthentication(
            name=q.name,
            namespace=q.namespace,
            jwt_rules=tuple(_jwt_rule_from_pb(j) for j in q.jwt_rules),
            selector=Labels(dict(q.selector)) if q.has_selector else None,
            target_refs=_refs_from_pb(q.target_refs),
        )
    raise ValueError(f"Discovery sent a resource with no known kind ({kind!r}); upgrade this node")


def trust_bundle_to_pb(b: TrustBundle) -> pb.TrustBundle:
    return pb.TrustBundle(trust_domain=b.trust_domain, roots=b.roots)


def trust_bundle_from_pb(m: pb.TrustBundle) -> TrustBundle:
    return TrustBundle(trust_domain=m.trust_domain, roots=tuple(m.roots))


def watch_response_to_pb(u: WatchUpdate) -> pb.WatchResponse:
    msg = pb.WatchResponse(
        epoch=u.epoch,
        version=u.version,
        snapshot=u.snapshot,
        upserts=[resource_to_pb(r) for r in u.upserts],
        removals=[pb.ResourceRef(type=int(t), key=k) for t, k in u.removals],  # type: ignore[arg-type]
    )
    if u.trust_bundle is not None:
        msg.trust_bundle.CopyFrom(trust_bundle_to_pb(u.trust_bundle))
    return msg


def watch_update_from_pb(m: pb.WatchResponse) -> WatchUpdate:
    """Converts one Discovery message.

    A workload whose identity cannot be formed (a controller bug or version
    skew: the registry validates names) is the one resource refused here. It
    becomes a removal, so a node never holds a workload without an identity,
    nor an older copy of it; the rest of the update applies.
    """
    upserts: list[Resource] = []
    removals = [(ResourceType(r.type), r.key) for r in m.removals]
    for r in m.upserts:
        try:
            upserts.append(resource_from_pb(r))
        except InvalidSpiffeId as e:
            w = r.workload
            log.error(
                "controller sent workload %s/%s with no valid identity (%s); dropping it. "
                "Hint: upgrade the controller or fix that workload's namespace or service account",
                w.namespace,
                w.name,
                e,
            )
            removals.append((ResourceType.WORKLOAD, f"{w.namespace}/{w.name}"))
    return WatchUpdate(
        epoch=m.epoch,
        version=m.version,
        snapshot=m.snapshot,
        upserts=tuple(upserts),
        removals=tuple(removals),
        trust_bundle=trust_bundle_from_pb(m.trust_bundle) if m.HasField("trust_bundle") else None,
    )


def watch_update_to_bytes(u: WatchUpdate) -> bytes:
    """One update as serialized ``WatchResponse`` bytes (for node-local IPC)."""
    return bytes(watch_response_to_pb(u).SerializeToString())


def watch_update_from_bytes(data: bytes) -> WatchUpdate:
    """The inverse of :func:`watch_update_to_bytes`; raises ValueError on bad input."""
    msg = pb.WatchResponse()
    try:
        msg.ParseFromString(data)
        return watch_update_from_pb(msg)
    except ValueError:
        raise
    except Exception as e:  # protobuf's DecodeError and enum errors
        raise ValueError(f"not a valid WatchResponse: {type(e).__name__}: {e}") from None
