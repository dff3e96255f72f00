"""Value types describing the node data plane, as the agent and `veilctl` report it."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from agent.bpf.maps import PodCounters
from agent.net.routing import PolicyRouting
from agent.net.tc import Hook

__all__ = ["AttachedProgram", "LoadedProgram", "NodeDataplaneState", "PodDataplaneState"]


@dataclass(frozen=True)
class AttachedProgram:
    """A Veil tc filter found on an interface."""

    name: str
    hook: Hook
    prog_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hook": str(self.hook), "prog_id": self.prog_id}


@dataclass(frozen=True)
class PodDataplaneState:
    """What the kernel knows about one local pod."""

    # The address the pod is known by: its IPv4 address, or for a pod with
    # IPv6 addresses only (its pods entry holds 0.0.0.0) its first IPv6 one.
    pod_ip: IPv4Address | IPv6Address
    ifindex: int
    host_ifname: str | None  # None: the veth is gone, the entry is stale
    enrolled: bool
    ingress: AttachedProgram | None
    egress: AttachedProgram | None
    counters: PodCounters
    # The pod's IPv6 source addresses (anti-spoof entries); empty: IPv6 is dropped.
    ipv6: tuple[IPv6Address, ...] = ()

    @property
    def protected(self) -> bool:
        """Enrolled with both programs attached: steered in, guarded out."""
        return self.enrolled and self.ingress is not None and self.egress is not None

    @property
    def stale(self) -> bool:
        return self.host_ifname is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pod_ip": str(self.pod_ip),
            "ifindex": self.ifindex,
            "host_ifname": self.host_ifname,
            "enrolled": self.enrolled,
            "protected": self.protected,
            "stale": self.stale,
            "ingress": self.ingress.to_dict() if self.ingress else None,
            "egress": self.egress.to_dict() if self.egress else None,
            "counters": self.counters.to_dict(),
            "ipv6": [str(ip) for ip in self.ipv6],
        }


@dataclass(frozen=True)
class LoadedProgram:
    """A pinned program and its kernel identity."""

    name: str
    pin: Path
    prog_id: int
    tag: str


@dataclass(frozen=True)
class NodeDataplaneState:
    """Node-wide state: programs, uplink, policy routing, config.

    ``loaded_build_id`` is the build the kernel runs (from the config map);
    ``source_build_id`` the build this agent's sources and options produce
    (None when only inspecting pins). They differ only mid-upgrade.
    """

    pin_dir: Path
    loaded_build_id: str
    source_build_id: str | None
    reused_pins: bool | None
    programs: tuple[LoadedProgram, ...]
    uplink_ifindex: int
    uplink_ifname: str | None
    uplink_program: AttachedProgram | None
    policy_routing: PolicyRouting
    probe_source: IPv4Address | None

    def _policy_routing_dict(self) -> dict[str, bool]:
        pr = self.policy_routing
        out = {"rule": pr.rule, "route": pr.route}
        if pr.ipv6_enabled:  # without IPv6 in the namespace there is no IPv6 half to report
            out.update(rule6=pr.rule6, route6=pr.route6)
        return out

    @property
    def in_sync(self) -> bool:
        return self.source_build_id is None or self.source_build_id == self.loaded_build_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "pin_dir": str(self.pin_dir),
            "loaded_build_id": self.loaded_build_id,
            "source_build_id": self.source_build_id,
            "in_sync": self.in_sync,
            "reused_pins": self.reused_pins,
            "programs": [
                {"name": p.name, "pin": str(p.pin), "prog_id": p.prog_id, "tag": p.tag}
                for p in self.programs
            ],
            "uplink": {
                "ifindex": self.uplink_ifindex,
                "ifname": self.uplink_ifname,
                "program": self.uplink_program.to_dict() if self.uplink_program else None,
            },
            "policy_routing": self._policy_routing_dict(),
            "probe_source": str(self.probe_source) if self.probe_source else None,
        }
