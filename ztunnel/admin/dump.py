"""JSON views of the ztunnel's state for ``/config_dump`` (pure functions).

Stable field names, sorted lists, no secrets: certificates are described by
identity, serial and validity, never by key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from controller.api.model import (
    AuthorizationPolicy,
    Namespace,
    PeerAuthentication,
    Rule,
    Service,
    Source,
    TrustBundle,
    Workload,
)
from node.policy import effective_mode, l7_terms
from node.state.snapshot import Snapshot

__all__ = [
    "config_dump",
    "namespace_json",
    "peer_authentication_json",
    "policy_json",
    "service_json",
    "trust_bundle_json",
    "workload_json",
]


def namespace_json(n: Namespace) -> dict[str, Any]:
    return {"name": n.name, "labels": dict(n.labels), "enrolled": n.enrolled}


def workload_json(w: Workload, snapshot: Snapshot | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key": w.key,
        "name": w.name,
        "namespace": w.namespace,
        "service_account": w.service_account,
        "node": w.node,
        "ips": list(w.ips),
        "labels": dict(w.labels),
        "enrolled": w.enrolled,
        "ready": w.ready,
        "trust_domain": w.trust_domain,
    }
    out["identity"] = str(w.identity)
    if snapshot is not None:
        out["local"] = w.node == snapshot.node
        out["peer_authentication"] = effective_mode(snapshot, w).value
        out["policies"] = [p.key for p in snapshot.policies_for(w)]
    return out


def service_json(s: Service) -> dict[str, Any]:
    return {
        "key": s.key,
        "name": s.name,
        "namespace": s.namespace,
        "vips": list(s.vips),
        "ports": [{"name": p.name, "port": p.port, "target_port": p.target_port} for p in s.ports],
        "selector": dict(s.selector),
        "endpoints": list(s.endpoints),
    }


def _source_json(s: Source) -> dict[str, Any]:
    fields = {
        "principals": s.principals,
        "notPrincipals": s.not_principals,
        "namespaces": s.namespaces,
        "notNamespaces": s.not_namespaces,
        "ipBlocks": s.ip_blocks,
        "notIpBlocks": s.not_ip_blocks,
        "requestPrincipals": s.request_principals,
        "notRequestPrincipals": s.not_request_principals,
    }
    return {k: list(v) for k, v in fields.items() if v}


_OPERATION_FIELDS = (
    ("ports", "not_ports", "notPorts"),
    ("hosts", "not_hosts", "notHosts"),
    ("methods", "not_methods", "notMethods"),
    ("paths", "not_paths", "notPaths"),
)


def _rule_json(r: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if r.sources:
        out["from"] = [{"source": _source_json(s)} for s in r.sources]
    if r.operations:
        out["to"] = [
            {
                "operation": {
                    k: list(v)
                    for pos, neg, neg_name in _OPERATION_FIELDS
                    for k, v in ((pos, getattr(o, pos)), (neg_name, getattr(o, neg)))
                    if v
                }
            }
            for o in r.operations
        ]
    if r.conditions:
        out["when"] = [
            {
                "key": c.key,
                **({"values": list(c.values)} if c.values else {}),
                **({"notValues": list(c.not_values)} if c.not_values else {}),
            }
            for c in r.conditions
        ]
    return out


def policy_json(p: AuthorizationPolicy) -> dict[str, Any]:
    return {
        "key": p.key,
        "name": p.name,
        "namespace": p.namespace,
        "action": p.action.value,
        "selector": dict(p.selector) if p.selector is not None else None,
        "rules": [_rule_json(r) for r in p.rules],
        # Attached to a waypoint: enforced there only, never by a ztunnel.
        "target_refs": [{"kind": t.kind, "name": t.name} for t in p.target_refs],
        # L7 fields a ztunnel cannot see (it fails closed on them).
        "l7_terms": sorted({t for r in p.rules for t in l7_terms(r)}),
    }


def peer_authentication_json(a: PeerAuthentication) -> dict[str, Any]:
    return {
        "key": a.key,
        "name": a.name,
        "namespace": a.namespace,
        "mode": a.mode.value,
        "selector": dict(a.selector) if a.selector is not None else None,
    }


def trust_bundle_json(b: TrustBundle | None) -> dict[str, Any] | None:
    if b is None:
        return None
    return {
        "trust_domain": b.trust_domain,
        "roots": [{"sha256": hashlib.sha256(r).hexdigest()} for r in b.roots],
    }


def config_dump(
    snapshot: Snapshot,
    *,
    certificates: Sequence[dict[str, Any]] = (),
    controller: dict[str, Any] | None = None,
    connections: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The whole ``/config_dump`` document."""
    return {
        "node": snapshot.node,
        "state": {
            "synced": snapshot.synced,
            "epoch": snapshot.epoch,
            "version": snapshot.version,
            "trust_domain": snapshot.trust_domain,
        },
        "controller": controller,
        "trust_bundle": trust_bundle_json(snapshot.trust_bundle),
        "namespaces": [namespace_json(n) for _, n in sorted(snapshot.namespaces.items())],
        "workloads": [workload_json(w, snapshot) for _, w in sorted(snapshot.workloads.items())],
        "services": [service_json(s) for _, s in sorted(snapshot.services.items())],
        "policies": [policy_json(p) for _, p in sorted(snapshot.policies.items())],
        "peer_authentications": [
            peer_authentication_json(a) for _, a in sorted(snapshot.peer_authentications.items())
        ],
        "certificates": list(certificates),
        "connections": list(connections),
    }
