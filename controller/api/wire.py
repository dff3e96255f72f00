"""Conversion between protobuf messages and the frozen model types.

This module, :mod:`controller.api.client` and :mod:`controller.service` are
the only places that touch generated ``_pb2`` code. Everything else in Veil
works with :mod:`controller.api.model`.
"""

from __future__ import annotations

import logging

from . import veil_pb2 as pb
from .model import (
    AuthorizationPolicy,
    Labels,
    Namespace,
    Operation,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    Resource,
    ResourceType,
    Rule,
    Service,
    ServicePort,
    Source,
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
    "watch_update_from_pb",
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
    )


def _source_from_pb(m: pb.Source) -> Source:
    return Source(
        principals=tuple(m.principals),
        not_principals=tuple(m.not_principals),
        namespaces=tuple(m.namespaces),
        not_namespaces=tuple(m.not_namespaces),
        ip_blocks=tuple(m.ip_blocks),
        not_ip_blocks=tuple(m.not_ip_blocks),
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
                ports=[pb.ServicePort(name=p.name, port=p.port, target_port=p.target_port) for p in r.ports],
                selector=dict(r.selector),
                endpoints=r.endpoints,
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
                rules=[
                    pb.Rule(
                        **{"from": [_source_to_pb(s) for s in rule.sources]},
                        to=[pb.Operation(ports=o.ports, not_ports=o.not_ports) for o in rule.operations],
                    )
                    for rule in r.rules
                ],
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
            ports=tuple(ServicePort(port=p.port, target_port=p.target_port, name=p.name) for p in s.ports),
            selector=Labels(dict(s.selector)),
            endpoints=tuple(s.endpoints),
        )
    if kind == "authorization_policy":
        p = m.authorization_policy
        return AuthorizationPolicy(
            name=p.name,
            namespace=p.namespace,
            action=_ACTION_FROM_PB[p.action],
            selector=Labels(dict(p.selector)) if p.has_selector else None,
            rules=tuple(
                Rule(
                    sources=tuple(_source_from_pb(s) for s in getattr(rule, "from")),
                    operations=tuple(
                        Operation(ports=tuple(o.ports), not_ports=tuple(o.not_ports)) for o in rule.to
                    ),
                )
                for rule in p.rules
            ),
        )
    if kind == "peer_authentication":
        a = m.peer_authentication
        return PeerAuthentication(
            name=a.name,
            namespace=a.namespace,
            mode=_MODE_FROM_PB[a.mode],
            selector=Labels(dict(a.selector)) if a.has_selector else None,
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
