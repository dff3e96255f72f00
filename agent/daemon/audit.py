"""The node audit behind ``veilctl verify``: can any enrolled pod bypass the mesh? (pure)

:func:`audit` takes what the agent knows (the desired pods from the registry,
the data plane's pod and node state, the listening ports of this network
namespace) and returns every check with its findings. Each finding names the
subject, what is wrong and the exact fix. Nothing here does IO except
:func:`listeners_from_proc`, which reads /proc/net/tcp{,6} of the current
namespace (agent.daemon.netinfo reads the sockets with their marks).

Checks:

* ``registry``: the agent holds the registry (without it, nothing can be vouched for);
* ``build``: the attached programs are the pinned build of the source shown by
  ``veilctl bpf source``, compiled without any fail-open flag;
* ``policy-routing``: the fwmark rules and the local routes exist, for IPv6 too
  when the namespace has IPv6;
* ``uplink``: the uplink program is attached and is the pinned one;
* ``listeners``: the ztunnel listens on 0.0.0.0 ports 15001, 15006 and 15008
  here, with the ztunnel mark the programs require of a capture socket;
* ``pods``: every enrolled local pod has ingress + egress guard attached with
  the pinned program ids, an anti-spoof entry (ifindex -> its IP) and a
  local address entry, for each of its IPv6 addresses too; every other local
  pod is tracked; no stale entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any, Final

from agent.bpf import NodeDataplaneState, PodDataplaneState
from node.dataplane import (
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    MARK_MASK,
    MARK_ZTUNNEL,
    OUTBOUND_PORT,
)

from .reconcile import DesiredPod

__all__ = [
    "CHECKS",
    "FAIL_OPEN_FLAGS",
    "ZTUNNEL_PORTS",
    "AuditInput",
    "AuditReport",
    "CheckResult",
    "Finding",
    "Listener",
    "audit",
    "check_listeners",
    "listeners_from_proc",
    "parse_proc_net_tcp",
]

ZTUNNEL_PORTS: Final = {
    OUTBOUND_PORT: "outbound capture",
    INBOUND_PLAINTEXT_PORT: "inbound plaintext",
    HBONE_PORT: "HBONE",
}
# Compile flags that would let traffic through when it should be dropped.
# None exists today; the check makes sure none ever ships silently.
FAIL_OPEN_FLAGS: Final = ("-DVEIL_FAIL_OPEN", "-DVEIL_ALLOW_BYPASS", "-DVEIL_NO_GUARD")
CHECKS: Final = ("registry", "build", "policy-routing", "uplink", "listeners", "pods")
_TCP_LISTEN: Final = "0A"


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    subject: str
    problem: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return {
            "check": self.check,
            "subject": self.subject,
            "problem": self.problem,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class Listener:
    """A listening TCP socket of this network namespace."""

    port: int
    address: str
    mark: int | None = None  # SO_MARK; None when it could not be read


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    detail: str
    findings: tuple[Finding, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class AuditReport:
    checks: tuple[CheckResult, ...]

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(f for c in self.checks for f in c.findings)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True, slots=True)
class AuditInput:
    """Everything the audit looks at, gathered by the agent in one pass."""

    synced: bool
    desired: tuple[DesiredPod, ...]
    pods: tuple[PodDataplaneState, ...]
    # local_ips and local_ips6 maps: address -> ifindex
    local_ips: Mapping[IPv4Address | IPv6Address, int]
    node: NodeDataplaneState
    cflags: tuple[str, ...]
    listening: tuple[Listener, ...] | None = None  # None: not checked here
    ignored: tuple[str, ...] = field(default=())


def _wildcard(address: str) -> bool:
    return address in ("0.0.0.0", "::")


def check_listeners(listeners: Iterable[Listener]) -> CheckResult:
    """The ztunnel's capture listeners, as the programs look them up.

    The programs ask the kernel for a listener on the wildcard address
    (0.0.0.0:port) and accept it only if it carries the ztunnel mark; any
    other socket makes them drop the packet (fail closed). So each port needs
    a wildcard listener with that mark.
    """
    by_port: dict[int, list[Listener]] = {}
    for ln in listeners:
        if ln.port in ZTUNNEL_PORTS:
            by_port.setdefault(ln.port, []).append(ln)
    fix_start = (
        "start the ztunnel on this node (veil ztunnel run, or check the ztunnel container "
        "of the veil-node pod), in the node's network namespace"
    )
    findings: list[Finding] = []
    for port, what in sorted(ZTUNNEL_PORTS.items()):
        found = by_port.get(port, [])
        wild = [ln for ln in found if _wildcard(ln.address)]
        if not found:
            problem = (
                f"nothing listens on :{port} ({what}); enrolled pods' connections are dropped "
                "(fail closed) until the ztunnel is back"
            )
            findings.append(Finding("listeners", f":{port}", problem, fix_start))
        elif not wild:
            where = ", ".join(sorted({ln.address for ln in found}))
            problem = (
                f":{port} ({what}) listens on {where} only; the programs look up 0.0.0.0:{port}, "
                "so every steered connection is dropped"
            )
            fix = "bind the ztunnel listeners to 0.0.0.0 (the default --listen-address)"
            findings.append(Finding("listeners", f":{port}", problem, fix))
        elif not any(ln.mark is None or ln.mark & MARK_MASK == MARK_ZTUNNEL for ln in wild):
            marks = ", ".join(sorted({f"{ln.mark:#x}" for ln in wild if ln.mark is not None}))
            problem = (
                f"the socket on :{port} ({what}) lacks the ztunnel mark {MARK_ZTUNNEL:#x} "
                f"(it has {marks}): the programs drop every steered connection as "
                "'foreign_listener'"
            )
            fix = (
                f"the ztunnel must set SO_MARK {MARK_ZTUNNEL:#x} on its listeners; if another "
                f"process holds :{port}, stop it"
            )
            findings.append(Finding("listeners", f":{port}", problem, fix))
    present = sorted(p for p in ZTUNNEL_PORTS if p in by_port)
    unknown = any(ln.mark is None for lns in by_port.values() for ln in lns)
    detail = f"listening: {', '.join(map(str, present)) or 'none'}" + (
        " (marks not readable)" if unknown else ""
    )
    return CheckResult("listeners", detail, tuple(findings))


def _programs(node: NodeDataplaneState) -> dict[str, int]:
    return {p.name: p.prog_id for p in node.programs}


def _check_registry(inp: AuditInput) -> CheckResult:
    if inp.synced:
        return CheckResult("registry", f"{len(inp.desired)} local pod addresses")
    return CheckResult(
        "registry",
        "not received",
        (
            Finding(
                "registry",
                "controller watch",
                "the agent has not received the registry yet, so enrollment cannot be verified",
                "check the controller address in the node state dir and `veilctl status` "
                "(watch error); the agent keeps the last enrollment meanwhile",
            ),
        ),
    )


def _check_build(inp: AuditInput) -> CheckResult:
    findings = []
    node = inp.node
    if not node.in_sync:
        findings.append(
            Finding(
                "build",
                str(node.pin_dir),
                f"the pins record build {node.loaded_build_id[:12] or '(none)'} but the agent "
                f"built {(node.source_build_id or '')[:12]}",
                "restart the agent (it swaps every filter to its build), or run "
                "`veil agent uninstall` and start it again",
            )
        )
    bad = [f for f in inp.cflags if any(f.startswith(flag) for flag in FAIL_OPEN_FLAGS)]
    if bad:
        findings.append(
            Finding(
                "build",
                "cflags",
                f"the programs were compiled with {', '.join(bad)}, which lets traffic bypass",
                "remove the flag from the agent's build options and restart the agent",
            )
        )
    return CheckResult("build", f"build {node.loaded_build_id[:12]}", tuple(findings))


def _check_policy_routing(inp: AuditInput) -> CheckResult:
    pr = inp.node.policy_routing
    findings = []
    if not pr.rule:
        findings.append(
            Finding(
                "policy-routing",
                "ip rule",
                "the fwmark rule is missing: steered packets are routed away instead of "
                "delivered to the ztunnel",
                "restart the agent (setup_node installs it again)",
            )
        )
    if not pr.route:
        findings.append(
            Finding(
                "policy-routing",
                "ip route",
                "the local route of the Veil table is missing: steered packets are not "
                "delivered locally",
                "restart the agent (setup_node installs it again)",
            )
        )
    if pr.ipv6_enabled:
        for present, subject, what in (
            (pr.rule6, "ip -6 rule", "the IPv6 fwmark rule is missing"),
            (pr.route6, "ip -6 route", "the IPv6 local route of the Veil table is missing"),
        ):
            if not present:
                findings.append(
                    Finding(
                        "policy-routing",
                        subject,
                        f"{what}: steered IPv6 packets are not delivered to the ztunnel "
                        "(they are dropped, never passed)",
                        "restart the agent (setup_node installs it again)",
                    )
                )
    detail = "fwmark rule and local route" + (", IPv4 and IPv6" if pr.ipv6_enabled else ", IPv4")
    return CheckResult("policy-routing", detail, tuple(findings))


def _check_uplink(inp: AuditInput) -> CheckResult:
    node = inp.node
    want = _programs(node).get("uplink_ingress")
    name = node.uplink_ifname or f"ifindex {node.uplink_ifindex}"
    fix = "restart the agent with --uplink set to the node's uplink interface"
    if not node.uplink_ifindex or node.uplink_ifname is None:
        return CheckResult(
            "uplink",
            "none",
            (Finding("uplink", name, "no uplink is configured, or it no longer exists", fix),),
        )
    if node.uplink_program is None:
        return CheckResult(
            "uplink",
            name,
            (
                Finding(
                    "uplink",
                    name,
                    "the uplink program is not attached: HBONE and plaintext traffic to local "
                    "pods is not steered to the ztunnel",
                    fix,
                ),
            ),
        )
    if want is not None and node.uplink_program.prog_id != want:
        return CheckResult(
            "uplink",
            name,
            (
                Finding(
                    "uplink",
                    name,
                    f"the uplink runs program {node.uplink_program.prog_id}, not the pinned {want}",
                    "restart the agent (it re-attaches the pinned program)",
                ),
            ),
        )
    return CheckResult("uplink", f"{name}, program {node.uplink_program.prog_id}")


def _ipv6_findings(
    d: DesiredPod,
    current: PodDataplaneState,
    local_ips: Mapping[IPv4Address | IPv6Address, int],
    fix: str,
) -> list[Finding]:
    """The pod's IPv6 anti-spoof and local address entries against the registry."""
    subject = f"{d.key} ({d.ip})"
    out: list[Finding] = []
    have = set(current.ipv6)
    for ip in d.ipv6:
        if ip not in have:
            out.append(
                Finding(
                    "pods",
                    subject,
                    f"no anti-spoof entry for its IPv6 address {ip} on {d.host_ifname}: "
                    "its IPv6 is dropped",
                    fix,
                )
            )
        if d.enrolled and local_ips.get(ip) != d.ifindex:
            out.append(
                Finding(
                    "pods",
                    subject,
                    f"local address entry for {ip} missing or pointing at another veth "
                    f"({local_ips.get(ip)}): IPv6 traffic to it is not steered inbound",
                    fix,
                )
            )
    for ip in sorted(have - set(d.ipv6)):
        out.append(
            Finding(
                "pods",
                subject,
                f"anti-spoof entry of {d.host_ifname} allows IPv6 {ip}, which the registry "
                "does not give this pod",
                fix,
            )
        )
    return out


def _pod_findings(
    d: DesiredPod,
    current: PodDataplaneState | None,
    local_ips: Mapping[IPv4Address | IPv6Address, int],
    programs: Mapping[str, int],
) -> list[Finding]:
    local_ifindex = local_ips.get(d.ip)
    subject = f"{d.key} ({d.ip})"
    fix_agent = "the agent repairs this on its next resync; if it persists, restart the agent"
    if d.ifindex is None:
        return [
            Finding(
                "pods",
                subject,
                f"no host veth found for the pod address: {d.veth_error or 'no route'}",
                f"check that the pod runs on this node and the CNI routes it "
                f"(ip route get {d.ip}); a pod that is not running has no traffic to verify",
            )
        ]
    if current is None:
        what = "enrolled" if d.enrolled else "tracked"
        return [
            Finding(
                "pods",
                subject,
                f"not {what} in the data plane (no entry for {d.host_ifname})",
                fix_agent,
            )
        ]
    out: list[Finding] = []
    if current.pod_ip != d.ip:
        out.append(
            Finding(
                "pods",
                subject,
                f"anti-spoof entry of {d.host_ifname} says {current.pod_ip}",
                fix_agent,
            )
        )
    out += _ipv6_findings(d, current, local_ips, fix_agent)
    if not d.enrolled:
        if current.enrolled:
            out.append(
                Finding("pods", subject, "enrolled but the registry opted it out", fix_agent)
            )
        if current.ingress is None:
            out.append(
                Finding(
                    "pods",
                    subject,
                    f"ingress program missing on {d.host_ifname}: its calls to enrolled pods are "
                    "dropped instead of steered",
                    fix_agent,
                )
            )
        return out
    if not current.enrolled:
        out.append(Finding("pods", subject, "registry enrolls it, data plane does not", fix_agent))
    for hook, attached, prog in (
        ("ingress", current.ingress, "pod_ingress"),
        ("egress guard", current.egress, "pod_egress"),
    ):
        want = programs.get(prog)
        if attached is None:
            out.append(
                Finding(
                    "pods",
                    subject,
                    f"{hook} program missing on {d.host_ifname}: the pod can bypass the ztunnel",
                    fix_agent,
                )
            )
        elif want is not None and attached.prog_id != want:
            out.append(
                Finding(
                    "pods",
                    subject,
                    f"{hook} on {d.host_ifname} runs program {attached.prog_id}, not the pinned "
                    f"{want}",
                    fix_agent,
                )
            )
    if local_ifindex != d.ifindex:
        out.append(
            Finding(
                "pods",
                subject,
                "local address entry missing or pointing at another veth "
                f"({local_ifindex}): traffic to it is not steered inbound",
                fix_agent,
            )
        )
    return out


def _check_pods(inp: AuditInput) -> CheckResult:
    programs = _programs(inp.node)
    by_ifindex = {p.ifindex: p for p in inp.pods}
    findings: list[Finding] = []
    for d in inp.desired:
        current = by_ifindex.get(d.ifindex) if d.ifindex is not None else None
        findings += _pod_findings(d, current, inp.local_ips, programs)
    known = {d.ip for d in inp.desired}
    for p in inp.pods:
        if p.pod_ip not in known:
            findings.append(
                Finding(
                    "pods",
                    f"{p.pod_ip} (ifindex {p.ifindex})",
                    "data-plane entry for an address no local workload has",
                    "the agent removes it on its next resync; if it persists, restart the agent",
                )
            )
    enrolled = sum(1 for d in inp.desired if d.enrolled)
    detail = f"{enrolled} enrolled, {len(inp.desired) - enrolled} not enrolled"
    return CheckResult("pods", detail, tuple(findings))


def audit(inp: AuditInput) -> AuditReport:
    """Every check, in :data:`CHECKS` order; the listener check only when ports were read."""
    checks = [
        _check_registry(inp),
        _check_build(inp),
        _check_policy_routing(inp),
        _check_uplink(inp),
    ]
    if inp.listening is not None:
        checks.append(check_listeners(inp.listening))
    if inp.synced:
        checks.append(_check_pods(inp))
    return AuditReport(tuple(checks))


def _hex_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return str(IPv4Address(raw[::-1]))  # /proc prints the address in host order
    if len(raw) == 16:
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        return str(IPv6Address(words))
    return text


def parse_proc_net_tcp(text: str) -> list[Listener]:
    """Listening sockets of a /proc/net/tcp or tcp6 table (marks are not in there)."""
    found: list[Listener] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == _TCP_LISTEN:
            address, _, port = fields[1].rpartition(":")
            try:
                found.append(Listener(int(port, 16), _hex_address(address)))
            except ValueError:
                continue
    return found


def listeners_from_proc(tables: Sequence[Path] = ()) -> tuple[Listener, ...]:
    """Listening sockets of the calling process's network namespace, from /proc."""
    paths = list(tables) or [Path("/proc/self/net/tcp"), Path("/proc/self/net/tcp6")]
    found: list[Listener] = []
    for path in paths:
        try:
            found += parse_proc_net_tcp(path.read_text())
        except OSError:
            continue
    return tuple(found)
