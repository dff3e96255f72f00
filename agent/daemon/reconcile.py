"""Enrollment reconciliation: what the kernel should hold for this node's pods (pure).

:func:`desired_pods` turns the watched snapshot into one :class:`DesiredPod`
per local IPv4 pod address (carrying the workload's IPv6 addresses, which
share its veth), or, for a workload with IPv6 addresses only, one keyed by
its first IPv6 address, with its host veth as found by a route lookup
(the lookup is passed in, so this module does no IO). :func:`plan` compares
those with what the data plane holds (:class:`~agent.bpf.PodDataplaneState`)
and returns the actions that close the gap, in a safe order:

1. :class:`Unenroll` entries no local workload owns (the pod is gone, or
   its veth vanished while the workload waits for a new one);
2. :class:`Refresh` pods whose address moved to another veth (a recreated
   pod that kept its IP);
3. :class:`Enroll` / :class:`MarkLocal` pods missing, partly attached, or
   with the wrong mode.

:class:`AwaitVeth` reports a workload whose veth does not exist yet (the
registry may learn of a pod before the CNI has wired it); the runner
retries. An entry on a veth that another desired pod now uses is left for
that pod's action to replace, so the veth is never left without programs in
between.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import assert_never

from agent.bpf import PodDataplaneState
from controller.api.model import Workload

__all__ = [
    "Action",
    "AwaitVeth",
    "DesiredPod",
    "DesiredState",
    "Enroll",
    "MarkLocal",
    "Refresh",
    "Unenroll",
    "VethLookup",
    "address_order",
    "describe",
    "desired_pods",
    "plan",
    "pod_problem",
    "workload_addresses",
    "workload_ipv4s",
    "workload_ipv6s",
]


@dataclass(frozen=True, slots=True)
class VethLookup:
    """Where a pod address leads on this node: its host-side veth, or why none was found."""

    ifindex: int | None
    ifname: str | None
    error: str | None = None

    @classmethod
    def found(cls, ifindex: int, ifname: str) -> VethLookup:
        return cls(ifindex, ifname)

    @classmethod
    def missing(cls, error: str) -> VethLookup:
        return cls(None, None, error)


@dataclass(frozen=True, slots=True)
class DesiredPod:
    """One local pod address as the registry wants it."""

    key: str  # "<namespace>/<name>"
    # The address the pod is known by: its IPv4 address, or for an IPv6-only
    # workload its first IPv6 address (also listed in ``ipv6``).
    ip: IPv4Address | IPv6Address
    enrolled: bool
    ifindex: int | None = None  # host-side veth; None while it cannot be found
    host_ifname: str | None = None
    veth_error: str | None = None
    # The workload's IPv6 addresses: steered and anti-spoofed on the same veth.
    ipv6: tuple[IPv6Address, ...] = ()

    @property
    def namespace(self) -> str:
        return self.key.partition("/")[0]

    @property
    def name(self) -> str:
        return self.key.partition("/")[2]


@dataclass(frozen=True, slots=True)
class DesiredState:
    """The desired pods plus the local addresses left out, and why."""

    pods: tuple[DesiredPod, ...]
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Enroll:
    """Steer the pod into the ztunnel and guard its veth (Dataplane.enroll)."""

    pod: DesiredPod
    reason: str


@dataclass(frozen=True, slots=True)
class MarkLocal:
    """Track a local pod that is not enrolled (Dataplane.mark_local_pod)."""

    pod: DesiredPod
    reason: str


@dataclass(frozen=True, slots=True)
class Refresh:
    """The pod's address now sits behind another veth: enroll or mark it there.

    The data plane drops the entries at ``stale_ifindexes`` as part of it.
    """

    pod: DesiredPod
    stale_ifindexes: tuple[int, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Unenroll:
    """Remove every trace of an address (Dataplane.unenroll)."""

    ip: IPv4Address | IPv6Address
    ifindex: int
    reason: str


@dataclass(frozen=True, slots=True)
class AwaitVeth:
    """Nothing can be done yet: the pod's veth is not there. Retried by the runner."""

    pod: DesiredPod
    reason: str


Action = Enroll | MarkLocal | Refresh | Unenroll | AwaitVeth


def _ipv4(text: str) -> IPv4Address | None:
    try:
        addr = ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, IPv4Address):
        return addr
    mapped = addr.ipv4_mapped
    return mapped


def _ipv6(text: str) -> IPv6Address | None:
    try:
        addr = ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is None and not addr.is_link_local:
        return addr
    return None


def workload_ipv6s(w: Workload) -> tuple[IPv6Address, ...]:
    """The IPv6 addresses of a workload (not IPv4-mapped, not link-local), sorted."""
    return tuple(sorted({ip for text in w.ips if (ip := _ipv6(text)) is not None}))


def workload_ipv4s(w: Workload) -> list[IPv4Address]:
    """The IPv4 addresses of a workload (IPv4-mapped IPv6 included)."""
    return [ip for text in w.ips if (ip := _ipv4(text)) is not None]


def workload_addresses(w: Workload) -> list[IPv4Address | IPv6Address]:
    """Every address of a workload the data plane may key it by: IPv4, then IPv6."""
    return [*workload_ipv4s(w), *workload_ipv6s(w)]


def desired_pods(
    workloads: Iterable[Workload],
    node: str,
    lookup: Callable[[IPv4Address | IPv6Address], VethLookup],
    *,
    owner_of: Callable[[str], Workload | None] | None = None,
) -> DesiredState:
    """The desired pods of ``node``: one per IPv4 address of each local workload.

    ``owner_of(ip)`` names the workload that wins an address several claim
    (pod churn reuses IPs; the ztunnel's snapshot decides, and the agent must
    agree with it). IPv6 addresses ride along with the workload's first IPv4
    address (they share its veth); a workload with IPv6 only is one pod
    known by its first IPv6 address, its veth found by a route lookup of it.
    """
    pods: dict[IPv4Address | IPv6Address, DesiredPod] = {}
    ignored: list[str] = []
    for w in sorted(workloads, key=lambda w: w.key):
        if w.node != node:
            continue
        v6 = workload_ipv6s(w)
        if v6 and not workload_ipv4s(w):
            _add_ipv6_only(w, v6, pods, ignored, lookup, owner_of)
        for text in w.ips:
            ip = _ipv4(text)
            if ip is None:
                if _ipv6(text) is None:
                    ignored.append(f"{w.key} {text}: neither IPv4 nor a routable IPv6 address")
                continue
            if owner_of is not None:
                owner = owner_of(str(ip))
                if owner is not None and owner.key != w.key:
                    ignored.append(f"{w.key} {ip}: address also claimed by {owner.key}, which wins")
                    continue
            if ip in pods:
                ignored.append(f"{w.key} {ip}: address also claimed by {pods[ip].key}, which wins")
                continue
            found = lookup(ip)
            # Only the first IPv4 address carries the IPv6 ones: one veth, one set.
            first = not any(p.key == w.key for p in pods.values())
            pods[ip] = DesiredPod(
                key=w.key,
                ip=ip,
                enrolled=w.enrolled,
                ifindex=found.ifindex,
                host_ifname=found.ifname,
                veth_error=found.error,
                ipv6=v6 if first else (),
            )
    return DesiredState(tuple(sorted(pods.values(), key=lambda p: p.key)), tuple(ignored))


def _add_ipv6_only(
    w: Workload,
    v6: tuple[IPv6Address, ...],
    pods: dict[IPv4Address | IPv6Address, DesiredPod],
    ignored: list[str],
    lookup: Callable[[IPv4Address | IPv6Address], VethLookup],
    owner_of: Callable[[str], Workload | None] | None,
) -> None:
    """Add the one pod of a workload with IPv6 addresses only, known by its first one."""
    mine: list[IPv6Address] = []
    for ip in v6:
        owner = owner_of(str(ip)) if owner_of is not None else None
        if owner is not None and owner.key != w.key:
            ignored.append(f"{w.key} {ip}: address also claimed by {owner.key}, which wins")
        elif ip in pods:
            ignored.append(f"{w.key} {ip}: address also claimed by {pods[ip].key}, which wins")
        else:
            mine.append(ip)
    if not mine:
        return
    found = lookup(mine[0])
    pods[mine[0]] = DesiredPod(
        key=w.key,
        ip=mine[0],
        enrolled=w.enrolled,
        ifindex=found.ifindex,
        host_ifname=found.ifname,
        veth_error=found.error,
        ipv6=tuple(mine),
    )


def address_order(ip: IPv4Address | IPv6Address) -> tuple[int, bytes]:
    """Sort key over both families (IPv4 first): the two types do not compare."""
    return (ip.version, ip.packed)


def _mode(enrolled: bool) -> str:
    return "enrolled" if enrolled else "not enrolled"


def pod_problem(
    d: DesiredPod, current: PodDataplaneState, programs: Mapping[str, int] | None
) -> str | None:
    """Why the data plane's ``current`` entry does not match ``d``, or None when it does."""
    if d.enrolled != current.enrolled:
        return f"data plane has it {_mode(current.enrolled)}, registry says {_mode(d.enrolled)}"
    if set(d.ipv6) != set(current.ipv6):
        have = ", ".join(map(str, sorted(current.ipv6))) or "none"
        return f"IPv6 addresses differ (data plane has {have})"
    if current.ingress is None:
        return "ingress program missing"
    if d.enrolled and current.egress is None:
        return "egress guard missing"
    if not d.enrolled and current.egress is not None:
        return "egress guard attached to a pod that is not enrolled"
    if programs:
        want_in = programs.get("pod_ingress")
        if want_in is not None and current.ingress.prog_id != want_in:
            return f"ingress runs program {current.ingress.prog_id}, expected {want_in}"
        want_out = programs.get("pod_egress")
        egress = current.egress
        if d.enrolled and egress is not None and want_out not in (None, egress.prog_id):
            return f"egress runs program {egress.prog_id}, expected {want_out}"
    return None


def plan(
    desired: Iterable[DesiredPod],
    actual: Iterable[PodDataplaneState],
    *,
    programs: Mapping[str, int] | None = None,
) -> list[Action]:
    """The actions that make the data plane hold exactly ``desired``.

    ``programs`` maps program names ("pod_ingress", "pod_egress") to the ids
    the filters must run; when given, a filter running another program is
    re-attached. Pure and deterministic: same inputs, same list.
    """
    wanted: dict[IPv4Address | IPv6Address, DesiredPod] = {}
    for d in sorted(desired, key=lambda d: d.key):
        wanted.setdefault(d.ip, d)
    claimed = {d.ifindex for d in wanted.values() if d.ifindex is not None}
    by_ip: dict[IPv4Address | IPv6Address, list[PodDataplaneState]] = {}
    for a in sorted(actual, key=lambda a: a.ifindex):
        by_ip.setdefault(a.pod_ip, []).append(a)

    removals: list[Action] = []
    for ip, entries in sorted(by_ip.items(), key=lambda kv: address_order(kv[0])):
        owner = wanted.get(ip)
        for a in entries:
            if owner is None:
                if a.ifindex in claimed:
                    continue  # the pod now on this veth replaces the entry in one step
                removals.append(Unenroll(ip, a.ifindex, "no local workload has this address"))
            elif owner.ifindex is None and a.host_ifname is None:
                removals.append(
                    Unenroll(ip, a.ifindex, f"{owner.key}: its veth (ifindex {a.ifindex}) is gone")
                )

    refreshes: list[Action] = []
    updates: list[Action] = []
    waits: list[Action] = []
    for d in sorted(wanted.values(), key=lambda d: d.key):
        if d.ifindex is None:
            waits.append(AwaitVeth(d, d.veth_error or "no host veth for this address yet"))
            continue
        entries = by_ip.get(d.ip, [])
        stale = tuple(a.ifindex for a in entries if a.ifindex != d.ifindex)
        current = next((a for a in entries if a.ifindex == d.ifindex), None)
        if stale:
            refreshes.append(
                Refresh(
                    d,
                    stale,
                    f"address moved from ifindex {','.join(map(str, stale))} to {d.host_ifname}",
                )
            )
            continue
        if current is None:
            reason = "new local pod"
        else:
            problem = pod_problem(d, current, programs)
            if problem is None:
                continue
            reason = problem
        updates.append(Enroll(d, reason) if d.enrolled else MarkLocal(d, reason))
    return [*removals, *refreshes, *updates, *waits]


def describe(action: Action) -> str:
    """One log/status line for an action."""
    match action:
        case Enroll(pod, reason):
            return f"enroll {pod.key} {pod.ip} on {pod.host_ifname}: {reason}"
        case MarkLocal(pod, reason):
            return f"track {pod.key} {pod.ip} on {pod.host_ifname} (not enrolled): {reason}"
        case Refresh(pod, _, reason):
            verb = "enroll" if pod.enrolled else "track"
            return f"{verb} {pod.key} {pod.ip} again on {pod.host_ifname}: {reason}"
        case Unenroll(ip, ifindex, reason):
            return f"remove {ip} (ifindex {ifindex}): {reason}"
        case AwaitVeth(pod, reason):
            return f"wait for the veth of {pod.key} {pod.ip}: {reason}"
        case _:
            assert_never(action)
