"""Pure views for veilctl: the JSON the components serve turned into table rows.

Every function here takes documents and returns rows or lines, so it is tested
with canned documents and no sockets. Filters (``-n/--namespace``,
``--workload``) and the what-if live next door in :mod:`.filters` and
:mod:`.whatif`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from agent.cli.output import Column, rfc3339

__all__ = [
    "POD_COLUMNS",
    "cert_rows",
    "connection_rows",
    "drops_text",
    "duration_text",
    "pod_rows",
    "policy_rows",
    "service_rows",
    "status_lines",
    "verify_lines",
    "workload_rows",
    "ztunnel_summary",
]


# -- formatting helpers --------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] if d else []
    if h or d:
        parts.append(f"{h}h")
    if m or h or d:
        parts.append(f"{m}m")
    parts.append(f"{s}s")
    return "".join(parts)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f} MiB"


def drops_text(drops: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(drops.items()) if v)


# -- status --------------------------------------------------------------------------


def status_lines(
    agent: Mapping[str, Any] | None,
    ztunnel: Mapping[str, Any] | None,
    errors: Mapping[str, str],
    now: float | None = None,
) -> dict[str, Any]:
    """The ``veilctl status`` table (key -> value) from /status and /config_dump."""
    now = time.time() if now is None else now
    out: dict[str, Any] = {}
    if agent is None:
        out["agent"] = f"UNREACHABLE: {errors.get('agent', '')}"
    else:
        dp = agent.get("dataplane") or {}
        out["agent"] = (
            f"running, pid {agent.get('pid')}, version {agent.get('version')}, "
            f"up {duration_text(agent.get('uptime_s'))}"
        )
        out["node"] = agent.get("node")
        out["agent cpu/rss"] = (
            f"{agent.get('cpu_percent', 0):.1f}% / {_mib(agent.get('rss_bytes'))}"
        )
        out["build"] = f"{str(dp.get('loaded_build_id', ''))[:12]}" + (
            "" if dp.get("in_sync", True) else " (OUT OF SYNC with the agent's sources)"
        )
        out["programs"] = " ".join(f"{p['name']}={p['prog_id']}" for p in dp.get("programs", []))
        up = dp.get("uplink") or {}
        prog = up.get("program")
        out["uplink"] = (
            f"{up.get('ifname')} (program {prog['prog_id']})"
            if prog
            else f"{up.get('ifname')} (NOT ATTACHED)"
        )
        pr = dp.get("policy_routing") or {}
        keys = ("rule", "route", "rule6", "route6") if "rule6" in pr else ("rule", "route")
        out["policy routing"] = (
            "fwmark rule + local route" + (" (IPv4 + IPv6)" if "rule6" in pr else "")
            if all(pr.get(k) for k in keys)
            else "INCOMPLETE ("
            + ", ".join(f"{k}={'yes' if pr.get(k) else 'no'}" for k in keys)
            + ")"
        )
        pods = agent.get("pods") or {}
        out["pods"] = (
            f"{pods.get('entries', 0)} in the data plane, {pods.get('enrolled', 0)} enrolled, "
            f"{pods.get('protected', 0)} protected"
        )
        reg = agent.get("registry") or {}
        out["registry"] = (
            f"synced, version {reg.get('version')}, {reg.get('local_workloads')} local workloads"
            if reg.get("synced")
            else "NOT SYNCED (waiting for the controller)"
        )
        watch = agent.get("watch") or {}
        out["controller watch"] = (
            "connected" if watch.get("connected") else f"DOWN: {watch.get('last_error') or '-'}"
        )
        last = agent.get("last_reconcile")
        if last:
            out["last reconcile"] = (
                f"{duration_text(now - float(last['at']))} ago, {last['duration_ms']} ms, "
                f"{len(last['actions'])} actions, {len(last['errors'])} errors, "
                f"{len(agent.get('pending', last['pending']))} pending"
            )
        else:
            out["last reconcile"] = "none yet"
        out["agent errors"] = len(agent.get("errors") or [])
    if ztunnel is None:
        out["ztunnel"] = f"UNREACHABLE: {errors.get('ztunnel', '')}"
    else:
        state = ztunnel.get("state") or {}
        ctl = ztunnel.get("controller") or {}
        out["ztunnel"] = "reachable"
        out["ztunnel state"] = (
            f"{'synced' if state.get('synced') else 'NOT SYNCED'}, version {state.get('version')}, "
            f"{sum(1 for w in ztunnel.get('workloads', []) if w.get('local'))} local workloads"
        )
        out["ztunnel controller"] = (
            "connected" if ctl.get("connected") else (f"DOWN: {ctl.get('last_error') or '-'}")
        )
        out["ztunnel certificates"] = len(ztunnel.get("certificates") or [])
        out["ztunnel connections"] = len(ztunnel.get("connections") or [])
    return out


def ztunnel_summary(dump: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ztunnel part of ``veilctl status -o json``: health, not the whole config dump."""
    if dump is None:
        return None
    return {
        "node": dump.get("node"),
        "state": dump.get("state"),
        "controller": dump.get("controller"),
        "local_workloads": sum(1 for w in dump.get("workloads", []) if w.get("local")),
        "certificates": {
            state: sum(1 for c in dump.get("certificates", []) if c.get("state") == state)
            for state in ("valid", "pending", "expired")
        },
        "connections": len(dump.get("connections") or []),
    }


# -- tables ---------------------------------------------------------------------------


def pod_rows(pods: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for p in pods:
        progs = p.get("programs") or {}
        red = p.get("redirected") or {}
        rows.append(
            {
                "pod": p.get("workload") or "-",
                "ip": _pod_addresses(p),
                "veth": p.get("veth"),
                "enrolled": p.get("enrolled"),
                "dataplane": p.get("dataplane"),
                "programs": f"in={progs.get('ingress') or '-'},eg={progs.get('egress') or '-'}",
                "redirected": f"{red.get('outbound', 0)}/{red.get('inbound', 0)}",
                "dropped": str(p.get("dropped", 0))
                + (f" ({drops_text(p.get('drops') or {})})" if p.get("dropped") else ""),
                "state": p.get("state"),
            }
        )
    return rows


def _pod_addresses(p: Mapping[str, Any]) -> str:
    """The pod's address and its IPv6 ones, comma separated (an IPv6-only pod lists each once)."""
    ip = p.get("ip")
    addrs = [str(ip)] if ip else []
    addrs += [str(a) for a in p.get("ipv6") or () if str(a) not in addrs]
    return ",".join(addrs) or "-"


POD_COLUMNS = (
    Column("POD", "pod"),
    Column("IP", "ip"),
    Column("VETH", "veth"),
    Column("ENROLLED", "enrolled"),
    Column("DATAPLANE", "dataplane"),
    Column("PROGRAMS", "programs"),
    Column("REDIRECTED(OUT/IN)", "redirected"),
    Column("DROPPED", "dropped"),
    Column("STATE", "state"),
)


def workload_rows(workloads: Sequence[Mapping[str, Any]], local_only: bool) -> list[dict[str, Any]]:
    return [
        {
            "workload": w.get("key"),
            "identity": w.get("identity"),
            "ips": w.get("ips"),
            "node": w.get("node"),
            "enrolled": w.get("enrolled"),
            "ready": w.get("ready"),
        }
        for w in workloads
        if not local_only or w.get("local", True)
    ]


def _rule_text(rule: Mapping[str, Any]) -> str:
    parts = []
    for src in rule.get("from", []):
        s = src.get("source", {})
        parts.append(
            "from " + " ".join(f"{k}={','.join(map(str, v))}" for k, v in sorted(s.items()))
        )
    for dst in rule.get("to", []):
        o = dst.get("operation", {})
        parts.append("to " + " ".join(f"{k}={','.join(map(str, v))}" for k, v in sorted(o.items())))
    for c in rule.get("when", []):
        values = ",".join(c.get("values", [])) or "!" + ",!".join(c.get("notValues", []))
        parts.append(f"when {c.get('key')}={values}")
    return "; ".join(parts) or "any"


def _l7_flag(p: Mapping[str, Any]) -> str:
    """Where a policy's L7 terms are enforced, and what a ztunnel makes of them."""
    refs = p.get("target_refs") or []
    if refs:
        return "waypoint: " + ",".join(f"{r.get('kind')}/{r.get('name')}" for r in refs)
    terms = p.get("l7_terms") or []
    if not terms:
        return "-"
    effect = "matches nothing at L4" if p.get("action") == "ALLOW" else "denies on L4 terms"
    return f"L7 at ztunnel ({','.join(terms)}): {effect}"


def policy_rows(policies: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "policy": p.get("key"),
            "action": p.get("action"),
            "selector": p.get("selector") if p.get("selector") is not None else "(namespace)",
            "rules": " | ".join(_rule_text(r) for r in p.get("rules", []))
            or "(none: matches nothing)",
            "l7": _l7_flag(p),
        }
        for p in policies
    ]


def cert_rows(
    certs: Sequence[Mapping[str, Any]], now: datetime | None = None
) -> list[dict[str, Any]]:
    now = now or datetime.now(UTC)
    rows = []
    for c in certs:
        due = c.get("rotation_due")
        rotation = "-"
        if due:
            at = datetime.fromisoformat(str(due))
            rotation = f"{rfc3339(due)} (due)" if at <= now else str(rfc3339(due))
        rows.append(
            {
                "identity": c.get("identity"),
                "state": c.get("state"),
                "serial": c.get("serial"),
                "not_after": rfc3339(c.get("not_after")),
                "rotation": rotation,
                "error": c.get("last_error"),
            }
        )
    return rows


def service_rows(
    services: Sequence[Mapping[str, Any]], workloads: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """``veilctl services``: each service's VIPs, ports and endpoints (with their IPs)."""
    ips = {w.get("key"): list(w.get("ips") or []) for w in workloads}
    rows = []
    for s in services:
        ports = [
            f"{p.get('port')}->{p.get('target_port')}" + (f"/{p['name']}" if p.get("name") else "")
            for p in s.get("ports") or []
        ]
        endpoints = [
            f"{e} ({','.join(ips[e])})" if ips.get(e) else f"{e} (unknown)"
            for e in s.get("endpoints") or []
        ]
        rows.append(
            {
                "service": s.get("key"),
                "vips": s.get("vips"),
                "ports": ports,
                "endpoints": endpoints or "(none)",
            }
        )
    return rows


def connection_rows(conns: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "direction": c.get("direction"),
            "src": f"{c.get('src')} {c.get('src_workload') or ''}".strip(),
            "src_identity": c.get("src_identity"),
            "dst": f"{c.get('dst')} {c.get('dst_workload') or ''}".strip(),
            "dst_identity": c.get("dst_identity"),
            "bytes": f"{c.get('bytes_received', 0)}/{c.get('bytes_sent', 0)}",
            "duration": duration_text(c.get("duration_s")),
            "started": rfc3339(c.get("started")),
            "verdict": c.get("verdict"),
        }
        for c in conns
        if "error" not in c
    ]


def verify_lines(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for c in report.get("checks", []):
        lines.append(f"{'ok  ' if c.get('ok') else 'FAIL'}  {c.get('name'):<15} {c.get('detail')}")
    findings = report.get("findings", [])
    if findings:
        lines.append("")
        lines.append(f"{len(findings)} finding(s):")
        for f in findings:
            lines.append(f"  [{f['check']}] {f['subject']}: {f['problem']}")
            lines.append(f"      fix: {f['fix']}")
    else:
        lines.append("")
        lines.append("no findings: every enrolled pod is steered into the ztunnel")
    return lines
