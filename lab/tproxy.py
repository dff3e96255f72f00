"""nftables TPROXY steering for a lab node: the redirection used until eBPF lands.

It gives a ztunnel running in the node namespace the same view the eBPF
programs will give it:

- TCP from an enrolled pod's host veth goes to the transparent listener on
  :15001 (``getsockname()`` = original destination, ``getpeername()`` = pod);
- TCP for a local enrolled pod arriving from anywhere else (the uplink, or a
  pod outside the mesh on this node) goes to :15008 when its destination port
  is 15008 (HBONE), to :15006 otherwise (plaintext inbound);
- a packet that belongs to an existing transparent socket is delivered to it.
  That covers replies to the ztunnel's own spoofed-source connections: when it
  connects to pod B *from pod A's IP* (same node, ``IP_TRANSPARENT``), B's
  SYN-ACK comes back in through B's veth addressed to A's IP and must reach
  that socket instead of being steered to :15001 again.
- fail closed: steered TCP with no listener to take it is dropped, never
  forwarded around the mesh.

Steered packets carry MARK_REDIRECT; an ``ip rule fwmark`` sends them to
ROUTE_TABLE, which holds ``local 0.0.0.0/0 dev lo``, so they are delivered
locally whatever their destination. Packets from the ztunnel's own sockets are
locally generated and never pass prerouting, except when they loop back
through ``lo``; those carry MARK_ZTUNNEL and are let through untouched.

The fwmark rule and ROUTE_TABLE are the ones the eBPF agent installs too, so
use this steering or the agent on a node, not both: disable_tproxy() removes
the rule whoever added it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lab.errors import LabError
from lab.netns import in_netns
from lab.process import run_in_netns
from lab.topology import LabNode, LabPod
from node.dataplane import (
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    MARK_MASK,
    MARK_REDIRECT,
    MARK_ZTUNNEL,
    OUTBOUND_PORT,
    ROUTE_TABLE,
    RULE_PRIORITY,
)

__all__ = ["TPROXY_TABLE", "disable_tproxy", "enable_tproxy", "tproxy_ruleset"]

TPROXY_TABLE = "veil_lab"
_KEEP = 0xFFFFFFFF & ~MARK_MASK


def _set(name: str, kind: str, elements: Iterable[str]) -> str:
    items = sorted(set(elements))
    body = f"type {kind};"
    if items:
        body += " elements = { " + ", ".join(items) + " };"
    return f"  set {name} {{ {body} }}\n"


def tproxy_ruleset(host_veths: Iterable[str], pod_ips: Iterable[str]) -> str:
    """The nft script that (re)creates the steering table, atomically.

    Declaring and deleting the table first makes the script replace any
    previous version in one transaction and succeed when there was none.
    """
    mark = f"meta mark set meta mark & 0x{_KEEP:08x} | 0x{MARK_REDIRECT:x}"
    veths = (f'"{v}"' for v in host_veths)
    return (
        f"table ip {TPROXY_TABLE}\n"
        f"delete table ip {TPROXY_TABLE}\n"
        f"table ip {TPROXY_TABLE} {{\n"
        + _set("enrolled_veths", "ifname", veths)
        + _set("enrolled_ips", "ipv4_addr", pod_ips)
        + "  chain prerouting {\n"
        "    type filter hook prerouting priority mangle; policy accept;\n"
        f"    meta mark & 0x{MARK_MASK:x} == 0x{MARK_ZTUNNEL:x} accept\n"
        f"    meta l4proto tcp socket transparent 1 {mark} accept\n"
        f"    iifname @enrolled_veths meta l4proto tcp tproxy to :{OUTBOUND_PORT} {mark} accept\n"
        "    iifname @enrolled_veths meta l4proto tcp drop\n"
        # Enrolled veths were settled above, so what remains comes from the
        # uplink or from pods outside the mesh.
        f"    ip daddr @enrolled_ips tcp dport {HBONE_PORT} tproxy to :{HBONE_PORT} {mark} accept\n"
        "    ip daddr @enrolled_ips meta l4proto tcp"
        f" tproxy to :{INBOUND_PLAINTEXT_PORT} {mark} accept\n"
        "    ip daddr @enrolled_ips meta l4proto tcp drop\n"
        "  }\n"
        "}\n"
    )


def enable_tproxy(node: LabNode, enrolled: Iterable[LabPod] | None = None) -> None:
    """Steer ``enrolled`` pods (default: every pod on the node); call again to change the set."""
    pods = list(node.pods if enrolled is None else enrolled)
    strangers = [p.name for p in pods if p.node is not node]
    if strangers:
        raise LabError(
            f"pods {strangers} do not run on node {node.name}",
            hint="steering is per node: enable it on each pod's own node",
        )
    script = tproxy_ruleset((p.host_veth for p in pods), (p.ip for p in pods))
    run_in_netns(node.netns, ["nft", "-f", "-"], input=script.encode())
    with in_netns(node.netns):
        ipr = IPRoute(groups=0)
    try:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.route("replace", dst="0.0.0.0/0", type="local", scope="host", oif=lo, table=ROUTE_TABLE)
        if not _our_rules(ipr):
            ipr.rule(
                "add",
                fwmark=MARK_REDIRECT,
                fwmask=MARK_MASK,
                table=ROUTE_TABLE,
                priority=RULE_PRIORITY,
            )
    finally:
        ipr.close()


def disable_tproxy(node: LabNode) -> None:
    """Remove the steering table, the fwmark rule and the local route (idempotent)."""
    run_in_netns(
        node.netns,
        ["nft", "-f", "-"],
        input=f"table ip {TPROXY_TABLE}\ndelete table ip {TPROXY_TABLE}\n".encode(),
    )
    with in_netns(node.netns):
        ipr = IPRoute(groups=0)
    try:
        for _ in _our_rules(ipr):
            ipr.rule(
                "del",
                fwmark=MARK_REDIRECT,
                fwmask=MARK_MASK,
                table=ROUTE_TABLE,
                priority=RULE_PRIORITY,
            )
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.route("del", dst="0.0.0.0/0", type="local", scope="host", oif=lo, table=ROUTE_TABLE)
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:  # ESRCH: already gone
                raise
    finally:
        ipr.close()


def _our_rules(ipr: IPRoute) -> list[object]:
    return [
        r
        for r in ipr.rule("dump")
        if r.get("FRA_FWMARK") == MARK_REDIRECT
        and r.get("FRA_FWMASK") == MARK_MASK
        and r.get("FRA_TABLE") == ROUTE_TABLE
    ]
