"""JSON documents of the agent's status API (pure functions of the agent's state).

Field names are stable: veilctl and scripts read them. Lists are sorted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.bpf import PodDataplaneState
from controller.api.model import Workload

from .reconcile import DesiredPod, address_order, pod_problem

__all__ = ["ReconcileReport", "pod_rows", "workload_rows"]


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """One reconcile pass, for /status and the log."""

    at: float  # wall-clock seconds
    duration_s: float
    state_version: int
    full: bool  # against every pod (resync) or after a registry change
    actions: tuple[str, ...]
    errors: tuple[str, ...]
    pending: tuple[str, ...]  # pods waiting for their veth

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "duration_ms": round(self.duration_s * 1000, 2),
            "state_version": self.state_version,
            "full": self.full,
            "actions": list(self.actions),
            "errors": list(self.errors),
            "pending": list(self.pending),
        }


def _programs(p: PodDataplaneState | None) -> dict[str, int | None]:
    return {
        "ingress": p.ingress.prog_id if p is not None and p.ingress is not None else None,
        "egress": p.egress.prog_id if p is not None and p.egress is not None else None,
    }


def _counters(p: PodDataplaneState | None) -> dict[str, Any]:
    if p is None:
        return {
            "redirected": {"outbound": 0, "inbound": 0},
            "established": 0,
            "dropped": 0,
            "drops": {},
        }
    c = p.counters
    return {
        "redirected": {"outbound": c.outbound_redirected, "inbound": c.inbound_redirected},
        "established": c.established,
        "dropped": c.dropped,
        "drops": {r.label: n for r, n in sorted(c.drops.items()) if n},
    }


def _dataplane_mode(p: PodDataplaneState | None) -> str:
    if p is None:
        return "absent"
    return "enrolled" if p.enrolled else "tracked"


def pod_rows(
    desired: Iterable[DesiredPod],
    actual: Iterable[PodDataplaneState],
    programs: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per local pod address, plus data-plane entries no workload owns."""
    by_ifindex = {p.ifindex: p for p in actual}
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for d in sorted(desired, key=lambda d: (d.key, address_order(d.ip))):
        current = by_ifindex.get(d.ifindex) if d.ifindex is not None else None
        if current is not None and current.pod_ip != d.ip:
            current = None  # the entry on that veth belongs to another address
        if current is not None:
            seen.add(current.ifindex)
        if d.ifindex is None:
            state = f"pending: {d.veth_error or 'no host veth yet'}"
        elif current is None:
            state = "pending: not in the data plane yet"
        else:
            problem = pod_problem(d, current, programs)
            state = "ok" if problem is None else f"drift: {problem}"
        rows.append(
            {
                "workload": d.key,
                "namespace": d.namespace,
                "name": d.name,
                "ip": str(d.ip),
                "ipv6": [str(ip) for ip in d.ipv6],
                "veth": d.host_ifname,
                "ifindex": d.ifindex,
                "enrolled": d.enrolled,
                "dataplane": _dataplane_mode(current),
                "protected": bool(current is not None and current.protected),
                # The kernel holds exactly what the registry asks (programs included).
                "attached": state == "ok",
                "programs": _programs(current),
                "state": state,
                **_counters(current),
            }
        )
    for p in sorted(by_ifindex.values(), key=lambda p: p.ifindex):
        if p.ifindex in seen:
            continue
        rows.append(
            {
                "workload": None,
                "namespace": None,
                "name": None,
                "ip": str(p.pod_ip),
                "ipv6": [str(ip) for ip in p.ipv6],
                "veth": p.host_ifname,
                "ifindex": p.ifindex,
                "enrolled": False,
                "dataplane": _dataplane_mode(p),
                "protected": p.protected,
                "attached": False,
                "programs": _programs(p),
                "state": "orphan: no local workload has this address",
                **_counters(p),
            }
        )
    return rows


def workload_rows(workloads: Iterable[Workload]) -> list[dict[str, Any]]:
    """The local workloads as the registry describes them."""
    rows = []
    for w in sorted(workloads, key=lambda w: w.key):
        identity = str(w.identity)
        rows.append(
            {
                "key": w.key,
                "namespace": w.namespace,
                "name": w.name,
                "service_account": w.service_account,
                "identity": identity,
                "node": w.node,
                "ips": list(w.ips),
                "enrolled": w.enrolled,
                "ready": w.ready,
                "labels": dict(w.labels),
            }
        )
    return rows
