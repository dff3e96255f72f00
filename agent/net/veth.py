"""Finding a pod's host-side interface, the way a CNI leaves it.

CNIs (and the lab) route each local pod address with a /32 (or /128) to the
host end of the pod's veth, so asking the kernel for the route to the pod IP
names the interface. A route through a gateway, or out the uplink, means the
address is not a local pod.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError as PyrNetlinkError

from agent.errors import NetlinkError, VethNotFoundError

__all__ = ["HostInterface", "host_interface", "host_interface_for_ip", "interface_name"]


@dataclass(frozen=True)
class HostInterface:
    ifindex: int
    ifname: str


def host_interface(ipr: Any, ifname: str) -> HostInterface:
    """The interface called ``ifname`` in this namespace."""
    try:
        found = ipr.link_lookup(ifname=ifname)
    except PyrNetlinkError as exc:
        raise NetlinkError(f"cannot look up interface {ifname}: {exc}") from exc
    if not found:
        raise VethNotFoundError(
            f"no interface named {ifname!r} in the node's network namespace",
            hint="check the name (ip link), and that the agent runs in the node's namespace",
        )
    return HostInterface(int(found[0]), ifname)


def interface_name(ipr: Any, ifindex: int) -> str | None:
    """Name of ``ifindex``, or None when it no longer exists."""
    try:
        links = ipr.get_links(ifindex)
    except PyrNetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise NetlinkError(f"cannot look up ifindex {ifindex}: {exc}") from exc
    for link in links:
        name = link.get_attr("IFLA_IFNAME")
        if name:
            return str(name)
    return None


def host_interface_for_ip(ipr: Any, pod_ip: IPv4Address | IPv6Address) -> HostInterface:
    """The host-side interface routing directly (no gateway) to ``pod_ip`` (either family)."""
    try:
        routes = ipr.route(
            "get",
            dst=str(pod_ip),
            family=socket.AF_INET6 if pod_ip.version == 6 else socket.AF_INET,
        )
    except PyrNetlinkError as exc:
        raise VethNotFoundError(
            f"no route to pod {pod_ip}: {exc.args[1] if len(exc.args) > 1 else exc}",
            hint="the CNI has not set the pod up yet, or the pod is not on this node",
        ) from exc
    for route in routes:
        oif = route.get_attr("RTA_OIF")
        if route.get_attr("RTA_GATEWAY") or oif is None:
            continue
        name = interface_name(ipr, int(oif))
        if name is not None and name != "lo":
            return HostInterface(int(oif), name)
    raise VethNotFoundError(
        f"pod {pod_ip} is not behind a local interface (its route goes through a gateway)",
        hint="enroll only pods running on this node; pass the host veth name explicitly "
        "if the CNI routes pods differently",
    )
