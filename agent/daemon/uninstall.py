"""``veil agent uninstall``: remove Veil from this node and say exactly what was removed.

Works without a compiler and with broken or missing pins (it scans the
kernel, not the agent's memory): every Veil tc filter in the network
namespace, the fwmark rule, the local route table and every pin under the
pin directory. What is found before is compared with what is left after, so
the report lists what went and anything that would not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from agent.bpf import PinLayout, uninstall_node
from agent.bpf.pins import validate_pin_dir
from agent.net import routing, tc, veth
from node.dataplane import MARK_MASK, MARK_REDIRECT, ROUTE_TABLE, RULE_PRIORITY

__all__ = ["NodeInstall", "UninstallReport", "scan", "uninstall"]


@dataclass(frozen=True, slots=True)
class NodeInstall:
    """What of Veil is present in this namespace and pin directory."""

    filters: tuple[str, ...]
    rule: bool
    route: bool
    pins: tuple[str, ...]
    rule6: bool = False
    route6: bool = False

    def items(self) -> list[str]:
        out = [f"tc filter {f}" for f in self.filters]
        if self.rule:
            out.append(
                f"ip rule fwmark {MARK_REDIRECT:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE} "
                f"priority {RULE_PRIORITY}"
            )
        if self.route:
            out.append(f"ip route local 0.0.0.0/0 dev lo table {ROUTE_TABLE}")
        if self.rule6:
            out.append(
                f"ip -6 rule fwmark {MARK_REDIRECT:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE} "
                f"priority {RULE_PRIORITY}"
            )
        if self.route6:
            out.append(f"ip -6 route local ::/0 dev lo table {ROUTE_TABLE}")
        out += [f"pin {p}" for p in self.pins]
        return out

    @property
    def empty(self) -> bool:
        return not self.items()


@dataclass(frozen=True, slots=True)
class UninstallReport:
    removed: tuple[str, ...]
    remaining: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"removed": list(self.removed), "remaining": list(self.remaining)}


def scan(pin_dir: Path, ipr: Any) -> NodeInstall:
    filters = []
    for link in ipr.get_links():
        ifindex = int(link["index"])
        name = veth.interface_name(ipr, ifindex) or f"ifindex {ifindex}"
        for f in tc.list_bpf_filters(ipr, ifindex):
            if f.ours:
                filters.append(f"{f.name} on {name} {f.hook} (program {f.prog_id})")
    pr = routing.policy_routing(ipr)
    pins = tuple(str(p) for p in PinLayout(pin_dir).all_pins())
    return NodeInstall(tuple(sorted(filters)), pr.rule, pr.route, pins, pr.rule6, pr.route6)


def uninstall(pin_dir: Path) -> UninstallReport:
    """Remove everything; the report says what went and what (if anything) is left."""
    validate_pin_dir(pin_dir)
    had_dir = pin_dir.is_dir()
    ipr = IPRoute(groups=0)
    try:
        before = scan(pin_dir, ipr)
        uninstall_node(pin_dir, ipr=ipr)
        after = scan(pin_dir, ipr)
    finally:
        with contextlib.suppress(Exception):
            ipr.close()
    left = after.items()
    if pin_dir.exists():
        left.append(f"directory {pin_dir}")
    removed = [i for i in before.items() if i not in set(left)]
    if had_dir and not pin_dir.exists():
        removed.append(f"directory {pin_dir}")
    return UninstallReport(removed=tuple(removed), remaining=tuple(left))
