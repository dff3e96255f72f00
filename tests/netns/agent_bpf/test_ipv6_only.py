"""IPv6 on its own: the node's IPv6 kubelet probe source passes the egress guard.

The data plane here is opened with ``DataplaneOptions(probe_source6=...)``
(a build flag) on a topology of its own; every address used belongs to a
namespace this test built.
"""

from __future__ import annotations

import contextlib
import socket
from ipaddress import IPv6Address
from typing import Any

from pyroute2 import IPRoute

from agent.bpf import Dataplane, DataplaneOptions, DropReason
from agent.bpf.dataplane import uninstall_node
from lab import in_netns

V6 = socket.AF_INET6
# A second node address, on the node's loopback: a source that is not the probe source.
OTHER6 = "fd00:99::7"


def _add_loopback_address(netns: str, addr: str) -> None:
    with in_netns(netns):
        ipr = IPRoute(groups=0)
    with contextlib.closing(ipr):
        lo = ipr.link_lookup(ifname="lo")[0]
        # nodad: usable at once, no duplicate address detection delay.
        ipr.addr("add", index=lo, address=addr, prefixlen=128, flags=0x02)


def _connects(netns: str, src: str, dst: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP handshake from ``src`` to ``dst`` completes within ``timeout``."""
    with in_netns(netns):
        sock = socket.socket(V6, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.bind((src, 0))
            sock.connect((dst, port))
        except OSError:
            return False
        return True


def test_ipv6_probe_source_reaches_an_enrolled_pod_and_no_other_source_does(
    topology: Any, fresh_pin_dir: Any
) -> None:
    topo = topology()
    node = topo.add_node("node-a")
    pod = topo.add_pod(node, "pod-0")
    topo.build()
    _add_loopback_address(node.netns, OTHER6)
    probe = node.underlay_ip6
    pin_dir = fresh_pin_dir(topo, node)
    with in_netns(pod.netns):
        server = socket.socket(V6, socket.SOCK_STREAM)
    with in_netns(node.netns):
        plane = Dataplane.open(pin_dir, DataplaneOptions(probe_source6=IPv6Address(probe)))
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("::", 8080))
        server.listen(16)  # handshakes complete in the backlog; nobody needs to accept
        plane.setup_node(node.uplink)
        assert "-DVEIL_PROBE_SOURCE6=1" in plane.unit.cflags
        # Both sources reach the pod before enrollment: the drop below is the guard's.
        assert _connects(node.netns, probe, pod.ip6, 8080)
        assert _connects(node.netns, OTHER6, pod.ip6, 8080)

        plane.enroll(pod.ip, ipv6=[pod.ip6])
        assert _connects(node.netns, probe, pod.ip6, 8080)
        assert not _connects(node.netns, OTHER6, pod.ip6, 8080)
        state = plane.pod(pod.ip)
        assert state is not None
        assert state.counters.drop_count(DropReason.NOT_ZTUNNEL) >= 1
    finally:
        server.close()
        plane.uninstall()
        with in_netns(node.netns):
            uninstall_node(pin_dir)
