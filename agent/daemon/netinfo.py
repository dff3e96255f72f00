"""The agent's read-only questions to the kernel: pod veths, the uplink, listening sockets.

Both go through one rtnetlink socket opened in the node's network namespace
(the agent process runs there). Lookups use agent.net's public helpers, the
same ones the data plane uses, so the agent and the data plane always agree
on a pod's veth.
"""

from __future__ import annotations

import socket
import sys
import threading
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from pyroute2 import DiagSocket, IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyrNetlinkError

from agent.errors import AgentError
from agent.net import veth
from node import split_host_port
from veil.errors import VeilError

from .audit import Listener, listeners_from_proc
from .errors import AgentStartupError
from .reconcile import VethLookup

__all__ = ["NodeNetwork", "tcp_listeners"]

_TCP_LISTEN_STATE = 10


class NodeNetwork:
    """An rtnetlink socket of the node namespace, safe to use from several threads."""

    def __init__(self) -> None:
        self._ipr: Any = IPRoute(groups=0)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._ipr.close()

    def veth_for(self, ip: IPv4Address | IPv6Address) -> VethLookup:
        """The host-side interface routing straight to ``ip`` (the CNI's /32 or /128 route)."""
        with self._lock:
            try:
                found = veth.host_interface_for_ip(self._ipr, ip)
            except AgentError as exc:
                return VethLookup.missing(exc.message)
        return VethLookup.found(found.ifindex, found.ifname)

    def detect_uplink(self, controller_address: str) -> str:
        """The interface of the route to the controller, else of the default route."""
        with self._lock:
            target = _controller_ip(controller_address)
            candidates = [target] if target else []
            candidates.append("1.1.1.1")  # any global address: the default route answers
            for dst in candidates:
                try:
                    routes = self._ipr.route("get", dst=dst)
                except PyrNetlinkError:
                    continue
                for route in routes:
                    oif = route.get_attr("RTA_OIF")
                    if oif is None:
                        continue
                    name = veth.interface_name(self._ipr, int(oif))
                    if name and name != "lo":
                        return name
        raise AgentStartupError(
            f"cannot tell the node's uplink: no route to the controller ({controller_address}) "
            "and no default route",
            hint="pass --uplink (or VEIL_UPLINK) with the node's uplink interface, e.g. eth0",
        )


def _mark(value: object) -> int | None:
    """INET_DIAG_MARK as pyroute2 returns it: an int, or hex bytes "00:02:00:00" (host order)."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int.from_bytes(bytes.fromhex(value.replace(":", "")), sys.byteorder)
        except ValueError:
            return None
    return None


def tcp_listeners() -> tuple[Listener, ...]:
    """Listening TCP sockets of this network namespace, with their SO_MARK.

    Uses sock_diag (the kernel reports marks to CAP_NET_ADMIN); without it,
    falls back to /proc/net/tcp, where marks are unknown. Blocking: call it
    from a worker thread in asyncio code.
    """
    found: list[Listener] = []
    try:
        with DiagSocket() as diag:
            diag.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in diag.get_sock_stats(family=family, states=1 << _TCP_LISTEN_STATE):
                    mark = None
                    for name, value in msg.get("attrs", []):
                        if name == "INET_DIAG_MARK":
                            mark = _mark(value)
                    found.append(Listener(int(msg["idiag_sport"]), str(msg["idiag_src"]), mark))
    except (OSError, PyrNetlinkError):
        return listeners_from_proc()
    # Without CAP_NET_ADMIN the kernel leaves the mark out; 0 is then not known.
    return tuple(found)


def _controller_ip(address: str) -> str | None:
    try:
        host, _ = split_host_port(address, 0)
    except VeilError:
        host = address.rsplit(":", 1)[0].strip("[]")
    try:
        addr = ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            return None
        return str(infos[0][4][0]) if infos else None
    return str(addr) if addr.version == 4 else None
