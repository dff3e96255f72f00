"""``veilctl policy check``: which policy would decide a connection, and why.

The ztunnel's ``/config_dump`` carries the workloads, namespaces and policies
it holds. This module rebuilds a :class:`~node.state.Snapshot` from that
document and asks the same pure evaluator the ztunnel uses
(:mod:`node.policy`), so the answer is the data path's answer for that state,
computed without touching a connection.

``--from`` is a workload (``NAME`` or ``NS/NAME``), a SPIFFE identity
(``spiffe://td/ns/NS/sa/SA``, or Istio's ``td/ns/NS/sa/SA``) or an IP. A
source without an identity is plaintext: the destination's peer
authentication decides first (STRICT refuses), as on :15006.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.api.model import (
    AuthorizationPolicy,
    Condition,
    Labels,
    Namespace,
    Operation,
    PeerAuthentication,
    PeerAuthMode,
    PolicyAction,
    Resource,
    Rule,
    Source,
    TargetRef,
    Workload,
)
from controller.api.spiffe import InvalidSpiffeId, SpiffeId
from node.policy import (
    Connection,
    ConnectionFacts,
    authorize,
    compile_policy,
    effective_mode,
    mode_source,
    plaintext_verdict,
)
from node.state import Snapshot, build_snapshot
from veil.errors import VeilError

__all__ = [
    "Endpoint",
    "WhatIfError",
    "check",
    "check_lines",
    "resolve_destination",
    "resolve_source",
    "snapshot_from_dump",
]


class WhatIfError(VeilError):
    """A --from or --to that names nothing in the ztunnel's state."""


def _labels(value: Mapping[str, str] | None) -> Labels | None:
    return None if value is None else Labels(value)


def _strs(doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return tuple(str(v) for v in doc.get(key) or ())


def _rule(doc: Mapping[str, Any]) -> Rule:
    """One rule, with every field the dump writes (ztunnel.admin.dump._rule_json).

    Dropping the L7 fields here would turn an L7 ALLOW into an L4 one and
    answer "allow" where the ztunnel fails closed, so nothing is left out.
    """
    sources = []
    for f in doc.get("from") or []:
        s = f.get("source") or {}
        sources.append(
            Source(
                principals=_strs(s, "principals"),
                not_principals=_strs(s, "notPrincipals"),
                namespaces=_strs(s, "namespaces"),
                not_namespaces=_strs(s, "notNamespaces"),
                ip_blocks=_strs(s, "ipBlocks"),
                not_ip_blocks=_strs(s, "notIpBlocks"),
                request_principals=_strs(s, "requestPrincipals"),
                not_request_principals=_strs(s, "notRequestPrincipals"),
            )
        )
    operations = []
    for t in doc.get("to") or []:
        o = t.get("operation") or {}
        operations.append(
            Operation(
                ports=tuple(int(p) for p in o.get("ports") or ()),
                not_ports=tuple(int(p) for p in o.get("notPorts") or ()),
                hosts=_strs(o, "hosts"),
                not_hosts=_strs(o, "notHosts"),
                methods=_strs(o, "methods"),
                not_methods=_strs(o, "notMethods"),
                paths=_strs(o, "paths"),
                not_paths=_strs(o, "notPaths"),
            )
        )
    conditions = tuple(
        Condition(key=str(c["key"]), values=_strs(c, "values"), not_values=_strs(c, "notValues"))
        for c in doc.get("when") or []
    )
    return Rule(sources=tuple(sources), operations=tuple(operations), conditions=conditions)


def snapshot_from_dump(dump: Mapping[str, Any]) -> Snapshot:
    """The ztunnel's state as a snapshot (from its ``/config_dump`` document)."""
    state = dump.get("state") or {}
    td = str(state.get("trust_domain") or "cluster.local")
    resources: list[Resource] = []
    for n in dump.get("namespaces") or []:
        resources.append(Namespace(n["name"], Labels(n.get("labels") or {})))
    for w in dump.get("workloads") or []:
        resources.append(
            Workload(
                name=w["name"],
                namespace=w["namespace"],
                service_account=w["service_account"],
                node=w.get("node") or "",
                ips=tuple(w.get("ips") or ()),
                labels=Labels(w.get("labels") or {}),
                enrolled=bool(w.get("enrolled")),
                ready=bool(w.get("ready", True)),
                trust_domain=w.get("trust_domain") or td,
            )
        )
    for p in dump.get("policies") or []:
        resources.append(
            AuthorizationPolicy(
                name=p["name"],
                namespace=p["namespace"],
                action=PolicyAction(p["action"]),
                rules=tuple(_rule(r) for r in p.get("rules") or []),
                selector=_labels(p.get("selector")),
                target_refs=tuple(
                    TargetRef(kind=str(r["kind"]), name=str(r["name"]))
                    for r in p.get("target_refs") or ()
                ),
            )
        )
    for a in dump.get("peer_authentications") or []:
        resources.append(
            PeerAuthentication(
                name=a["name"],
                namespace=a["namespace"],
                mode=PeerAuthMode(a["mode"]),
                selector=_labels(a.get("selector")),
            )
        )
    return build_snapshot(
        str(dump.get("node") or ""),
        resources,
        epoch=str(state.get("epoch") or ""),
        version=int(state.get("version") or 0),
        trust_bundle=None,
        trust_domain=td,
    )


def _workload(snapshot: Snapshot, name: str) -> Workload | None:
    if "/" in name:
        return snapshot.workloads.get(name)
    found = [w for w in snapshot.workloads.values() if w.name == name]
    if len(found) > 1:
        raise WhatIfError(
            f"workload name {name!r} exists in several namespaces",
            hint="write NAMESPACE/NAME, e.g. " + ", ".join(sorted(w.key for w in found)[:3]),
        )
    return found[0] if found else None


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    workload: Workload | None
    identity: SpiffeId | None


def resolve_source(snapshot: Snapshot, text: str) -> Endpoint:
    """--from: a workload, an identity, or an IP."""
    try:
        ip = str(ipaddress.ip_address(text))
    except ValueError:
        ip = ""
    if ip:
        w = snapshot.workload_by_ip(ip)
        return Endpoint(ip, w, None)
    if text.startswith("spiffe://") or "/sa/" in text:
        try:
            ident = SpiffeId.parse(text if text.startswith("spiffe://") else "spiffe://" + text)
        except InvalidSpiffeId as e:
            raise WhatIfError(f"--from {text!r} is not a SPIFFE ID: {e.message}") from None
        holder = next((w for w in snapshot.workloads.values() if w.identity == ident), None)
        return Endpoint(holder.ips[0] if holder and holder.ips else "0.0.0.0", holder, ident)
    w = _workload(snapshot, text)
    if w is None:
        raise WhatIfError(
            f"--from {text!r} is not a workload, identity or IP the ztunnel knows",
            hint="list them with `veilctl workloads --all`",
        )
    return Endpoint(w.ips[0] if w.ips else "0.0.0.0", w, w.identity)


def resolve_destination(snapshot: Snapshot, text: str) -> tuple[Workload, int]:
    """--to WORKLOAD:PORT (or IP:PORT, [v6]:PORT)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise WhatIfError(
            f"--to {text!r} is not WORKLOAD:PORT", hint="e.g. --to shop/payments:8080"
        )
    host = host.strip("[]")
    try:
        w = snapshot.workload_by_ip(str(ipaddress.ip_address(host)))
    except ValueError:
        w = _workload(snapshot, host)
    if w is None:
        raise WhatIfError(
            f"--to {host!r} is not a workload the ztunnel knows",
            hint="list them with `veilctl workloads --all`",
        )
    return w, int(port)


def check(snapshot: Snapshot, source: Endpoint, dest: Workload, port: int) -> dict[str, Any]:
    """The verdict, the deciding policy and reason, and each applicable policy's match."""
    dst_ip = dest.ips[0] if dest.ips else ""
    conn = Connection(src_ip=source.ip, dst_ip=dst_ip, dst_port=port, src_identity=source.identity)
    facts = ConnectionFacts.of(source.ip, port, source.identity)
    considered: list[dict[str, Any]] = []
    for p in snapshot.policies_for(dest):
        compiled = compile_policy(p)
        considered.append(
            {
                "policy": p.key,
                "action": p.action.value,
                "matches": compiled.invalid is None and compiled.matches(facts),
                "invalid": compiled.invalid,
            }
        )
    mode = effective_mode(snapshot, dest)
    decided_by = mode_source(snapshot, dest)
    out: dict[str, Any] = {
        "from": {
            "ip": source.ip,
            "workload": source.workload.key if source.workload else None,
            "identity": str(source.identity) if source.identity else None,
        },
        "to": {"workload": dest.key, "ip": dst_ip, "port": port, "identity": str(dest.identity)},
        "transport": "hbone" if source.identity is not None else "plaintext",
        "peer_authentication": {
            "mode": mode.value,
            "source": decided_by.key if decided_by is not None else "(default)",
        },
        "policies": considered,
    }
    if source.identity is None:
        pv = plaintext_verdict(snapshot, dest)
        if not pv.allowed:
            out.update(allowed=False, reason=pv.reason, policy=out["peer_authentication"]["source"])
            return out
    verdict = authorize(conn, snapshot, dest)
    out.update(allowed=verdict.allowed, reason=verdict.reason, policy=verdict.policy)
    return out


def check_lines(result: Mapping[str, Any]) -> Sequence[str]:
    """The table form of :func:`check`."""
    src, dst = result["from"], result["to"]
    who = src.get("workload") or src.get("identity") or src.get("ip")
    lines = [
        f"{'ALLOW' if result['allowed'] else 'DENY'}: {who} -> {dst['workload']}:{dst['port']}",
        f"  decided by: {result.get('policy') or '(no policy)'}",
        f"  reason:     {result['reason']}",
        f"  transport:  {result['transport']}"
        + (f" as {src['identity']}" if src.get("identity") else " (no identity)"),
        f"  peer auth:  {result['peer_authentication']['mode']} "
        f"({result['peer_authentication']['source']})",
        "  policies applying to the destination:",
    ]
    if not result["policies"]:
        lines.append("    (none: allowed unless peer authentication refuses plaintext)")
    for p in result["policies"]:
        state = (
            "INVALID " + str(p["invalid"])
            if p["invalid"]
            else ("matches" if p["matches"] else "no match")
        )
        lines.append(f"    {p['action']:<5} {p['policy']:<40} {state}")
    return lines
