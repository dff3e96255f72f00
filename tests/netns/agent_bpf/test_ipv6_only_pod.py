"""A pod the mesh knows by its IPv6 address only: found, steered, anti-spoofed, removed.

The lab's pods are dual-stack; here each one is enrolled by its IPv6
address alone (its veth found by a route lookup of that address), so its
pods entry holds no IPv4 address and any IPv4 it sends is a spoof. The
stand-in listeners are bound to [::] with IPV6_TRANSPARENT and the
ztunnel mark (see conftest). Addresses outside the lab are never reached.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from agent.bpf import DropReason
from node.dataplane import OUTBOUND_PORT
from tests.support.polling import wait_for

# An address in node-b's IPv6 pod prefix where no pod exists: only capture can answer it.
NOWHERE6 = "fd00:244:2::fa"
V6 = socket.AF_INET6


def test_ipv6_only_pod_is_found_by_route_and_its_tcp_captured(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "v6o")
    ip6 = ipaddress.IPv6Address(pod.ip6)
    zt = ztunnel(node, OUTBOUND_PORT, family=V6)

    state = plane.enroll(ip6)  # no veth name: the IPv6 route lookup finds it
    assert state.host_ifname == pod.host_veth
    assert state.pod_ip == ip6 and state.ipv6 == (ip6,) and state.protected
    dump = plane.maps_dump()
    assert {e.ip for e in dump.local_ips if e.ifindex == state.ifindex} == {ip6}
    assert {a.ip for a in dump.pod_addrs if a.ifindex == state.ifindex} == {ip6}

    with net.connect(pod.netns, NOWHERE6, 8080) as sock:
        got = zt.next()
        assert got.port == OUTBOUND_PORT
        assert got.sockname == (NOWHERE6, 8080)  # the original destination
        assert got.peername[0] == pod.ip6  # the real client address
        assert net.roundtrip(sock, b"v6-only through the ztunnel") == b"v6-only through the ztunnel"

    current = plane.pod(ip6)
    assert current is not None and current.ifindex == state.ifindex
    assert current.counters.outbound_redirected == 1
    assert current.counters.dropped == 0


def test_ipv6_only_pod_cannot_spoof_another_address_or_use_ipv4(
    bpf_lab: Any, ztunnel: Any, net: Any, packets: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    liar = bpf_lab.new_pod("node-a", "v6l")
    victim = bpf_lab.new_pod("node-a", "v6v")
    zt = ztunnel(node, OUTBOUND_PORT, family=V6)
    plane.enroll(liar.ip6)
    plane.enroll(victim.ip6)

    frame = net.ipv6_frame(
        liar.mac,
        liar.host_veth_mac,
        victim.ip6,
        NOWHERE6,
        socket.IPPROTO_TCP,
        net.tcp_syn6(victim.ip6, NOWHERE6, 40000, 80),
    )
    net.send_frame(liar.netns, "eth0", frame)

    def spoofs() -> int:
        return int(plane.pod(liar.ip6).counters.drop_count(DropReason.SPOOFED_SOURCE))

    assert wait_for(lambda: spoofs() == 1)
    zt.assert_idle()
    assert plane.pod(victim.ip6).counters.dropped == 0

    # Its IPv4 address is not one the mesh knows it by: dropped, never passed.
    assert net.connect_fails(liar.netns, victim.ip, 8080, timeout=0.5)
    assert wait_for(lambda: spoofs() >= 2)

    # Nor is 0.0.0.0, which its pods entry holds in place of an IPv4 address.
    # (A raw IP socket would fill a zero source in, so this goes out as a frame.)
    eth = (
        bytes.fromhex(liar.host_veth_mac.replace(":", "") + liar.mac.replace(":", "")) + b"\x08\x00"
    )
    udp = packets("udp", "0.0.0.0", victim.ip, 68, 67, b"veil")
    net.send_frame(liar.netns, "eth0", eth + udp)
    assert wait_for(lambda: spoofs() >= 3)

    # The same SYN from the pod's own IPv6 address is captured.
    with net.connect(liar.netns, NOWHERE6, 80):
        assert zt.next().peername[0] == liar.ip6


def test_moving_to_ipv6_only_and_unenrolling_remove_every_entry(bpf_lab: Any) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "v6u")
    ip4 = ipaddress.IPv4Address(pod.ip)
    ip6 = ipaddress.IPv6Address(pod.ip6)

    def entries() -> tuple[set[Any], set[Any]]:
        dump = plane.maps_dump()
        return (
            {a.ip for a in dump.pod_addrs if a.ifindex == dual.ifindex},
            {e.ip for e in dump.local_ips if e.ifindex == dual.ifindex},
        )

    dual = plane.enroll(ip4, ipv6=[ip6])
    assert entries() == ({ip4, ip6}, {ip4, ip6})

    only6 = plane.enroll(ip6)  # the registry dropped its IPv4 address
    assert only6.ifindex == dual.ifindex and only6.pod_ip == ip6
    assert entries() == ({ip6}, {ip6})
    assert plane.pod(ip4) is None

    assert plane.unenroll(ip6)
    assert entries() == (set(), set())
    assert plane.pod(ip6) is None
    assert all(p.ifindex != dual.ifindex for p in plane.pods())
    assert not plane.unenroll(ip6)
