"""IPv6 takes the same road as IPv4: captured, anti-spoofed, guarded, never passed.

The stand-in listeners are bound to [::] with IPV6_TRANSPARENT and the
ztunnel mark (see conftest); the lab gives every pod an fd00:244:<n>::/64
address next to its IPv4 one. Addresses outside the lab are never reached.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import Any

import pytest
from pyroute2 import IPRoute

from agent.bpf import DropReason
from lab import in_netns
from node.dataplane import HBONE_PORT, INBOUND_PLAINTEXT_PORT, MARK_ZTUNNEL, OUTBOUND_PORT
from tests.support.polling import wait_for

# An address in node-b's IPv6 pod prefix where no pod exists: only capture can answer it.
NOWHERE6 = "fd00:244:2::fa"
V6 = socket.AF_INET6


def _link_local(netns: str, ifname: str) -> str:
    with in_netns(netns):
        ipr = IPRoute(groups=0)
    with contextlib.closing(ipr):
        index = ipr.link_lookup(ifname=ifname)[0]
        for msg in ipr.get_addr(family=V6, index=index):
            addr = msg.get_attr("IFA_ADDRESS")
            if ipaddress.IPv6Address(addr).is_link_local:
                return str(addr)
    raise AssertionError(f"{ifname} in {netns} has no link-local address")


def _connect_link_local(netns: str, ip: str, port: int, *, timeout: float) -> None:
    """Connect to ``ip%eth0`` from the pod (the scope is the pod's eth0, not ours)."""
    with in_netns(netns):
        sock = socket.socket(V6, socket.SOCK_STREAM)
        scope = socket.if_nametoindex("eth0")
    with sock:
        sock.settimeout(timeout)
        sock.connect((ip, port, 0, scope))


def _neigh_mac(netns: str, ifname: str, ip: str) -> str | None:
    with in_netns(netns):
        ipr = IPRoute(groups=0)
    with contextlib.closing(ipr):
        index = ipr.link_lookup(ifname=ifname)[0]
        for msg in ipr.get_neighbours(family=V6, ifindex=index, dst=ip):
            mac = msg.get_attr("NDA_LLADDR")
            if mac:
                return str(mac)
    return None


def test_ipv6_tcp_is_captured_with_original_destination_and_client_ip(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "cap6")
    zt = ztunnel(node, OUTBOUND_PORT, family=V6)
    state = plane.enroll(pod.ip, ipv6=[pod.ip6])
    assert state.ipv6 == (ipaddress.IPv6Address(pod.ip6),)

    with net.connect(pod.netns, NOWHERE6, 8080) as sock:
        got = zt.next()
        assert got.port == OUTBOUND_PORT
        assert got.sockname == (NOWHERE6, 8080)  # the original destination
        assert got.peername[0] == pod.ip6  # the real client address
        assert net.roundtrip(sock, b"v6 through the ztunnel") == b"v6 through the ztunnel"

    counters = plane.pod(pod.ip).counters
    assert counters.outbound_redirected == 1
    assert counters.established >= 2
    assert counters.dropped == 0


def test_ipv6_without_listener_drops_the_syn_and_never_bypasses(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "nol6")
    server_pod = bpf_lab.new_pod("node-b", "srv6")
    server = net.tcp_server(server_pod.netns, "::", 8080)
    try:
        # Reachable before enrollment: the drop below is the program's doing.
        net.connect(pod.netns, server_pod.ip6, 8080).close()
        # Only an IPv4 capture listener: it must not be mistaken for an IPv6 one.
        ztunnel(node, OUTBOUND_PORT)
        plane.enroll(pod.ip, ipv6=[pod.ip6])
        assert net.connect_fails(pod.netns, server_pod.ip6, 8080)
        assert plane.pod(pod.ip).counters.drop_count(DropReason.NO_LISTENER) >= 1

        impostor = ztunnel(node, OUTBOUND_PORT, mark=0, family=V6)
        assert net.connect_fails(pod.netns, server_pod.ip6, 8080)
        impostor.assert_idle()
        assert plane.pod(pod.ip).counters.drop_count(DropReason.FOREIGN_LISTENER) >= 1
    finally:
        server.close()


def test_ipv6_source_of_another_pod_is_dropped_as_spoofed(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    liar = bpf_lab.new_pod("node-a", "spf6")
    victim = bpf_lab.new_pod("node-a", "vic6")
    zt = ztunnel(node, OUTBOUND_PORT, family=V6)
    plane.enroll(liar.ip, ipv6=[liar.ip6])
    plane.enroll(victim.ip, ipv6=[victim.ip6])

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
        return int(plane.pod(liar.ip).counters.drop_count(DropReason.SPOOFED_SOURCE))

    assert wait_for(lambda: spoofs() == 1)
    zt.assert_idle()
    assert plane.pod(victim.ip).counters.dropped == 0

    # The same SYN from the pod's own address is captured.
    with net.connect(liar.netns, NOWHERE6, 80):
        assert zt.next().peername[0] == liar.ip6


def test_node_service_on_ipv6_wildcard_is_not_reachable_at_the_link_local_gateway(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    # A node process on [::]:port answers any local address, the host veth's
    # fe80:: one included. The pod's own link-local source is not an address
    # the mesh knows it by, so the SYN is dropped as spoofed, never passed.
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "ll6")
    service = net.tcp_server(node.netns, "::", 9913)
    zt = ztunnel(node, OUTBOUND_PORT, family=V6)
    try:
        gateway = _link_local(node.netns, pod.host_veth)
        _connect_link_local(pod.netns, gateway, 9913, timeout=3.0)  # reachable before enrollment
        plane.enroll(pod.ip, ipv6=[pod.ip6])
        with pytest.raises(OSError):
            _connect_link_local(pod.netns, gateway, 9913, timeout=1.0)
        assert plane.pod(pod.ip).counters.drop_count(DropReason.SPOOFED_SOURCE) >= 1
        zt.assert_idle()
    finally:
        service.close()


def test_ipv6_before_the_pod_address_is_known_is_dropped_but_neighbour_discovery_works(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "unk6")
    remote = bpf_lab.new_pod("node-b", "rem6")
    ztunnel(node, OUTBOUND_PORT, family=V6)
    plane.enroll(pod.ip)  # IPv4 only: the registry has not told us its IPv6 yet
    assert plane.pod(pod.ip).ipv6 == ()

    # From the pod: dropped and counted, whatever the protocol.
    assert net.connect_fails(pod.netns, remote.ip6, 8080)
    with in_netns(pod.netns):
        udp = socket.socket(V6, socket.SOCK_DGRAM)
    with udp:
        udp.sendto(b"x", (remote.ip6, 5353))

    def unknown() -> int:
        return int(plane.pod(pod.ip).counters.drop_count(DropReason.IPV6_UNKNOWN))

    assert wait_for(lambda: unknown() >= 2)

    # To the pod: the node still resolves its neighbour (NS out, NA back), but
    # the datagram itself is dropped by the guard.
    with in_netns(pod.netns):
        receiver = socket.socket(V6, socket.SOCK_DGRAM)
    with receiver:
        receiver.bind(("::", 5353))
        receiver.settimeout(0.5)
        before = unknown()
        with in_netns(node.netns):
            sender = socket.socket(V6, socket.SOCK_DGRAM)
        with sender:
            sender.sendto(b"to the pod", (pod.ip6, 5353))
        assert wait_for(lambda: _neigh_mac(node.netns, pod.host_veth, pod.ip6) == pod.mac)
        assert wait_for(lambda: unknown() > before)
        try:
            data = receiver.recv(100)
        except TimeoutError:
            data = b""
        assert data == b""

        # Once the address is known, IPv6 UDP flows like IPv4 UDP.
        plane.enroll(pod.ip, ipv6=[pod.ip6])
        with in_netns(node.netns):
            sender = socket.socket(V6, socket.SOCK_DGRAM)
        with sender:
            sender.sendto(b"known now", (pod.ip6, 5353))
        assert receiver.recv(100) == b"known now"


def test_egress_guard_drops_unmarked_ipv6_to_an_enrolled_pod(bpf_lab: Any, net: Any) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    guarded = bpf_lab.new_pod("node-a", "grd6")
    server = net.tcp_server(guarded.netns, "::", 8080)
    try:
        net.connect(node.netns, guarded.ip6, 8080).close()  # reachable before enrollment
        plane.enroll(guarded.ip, ipv6=[guarded.ip6])
        assert net.connect_fails(node.netns, guarded.ip6, 8080)
        assert plane.pod(guarded.ip).counters.drop_count(DropReason.NOT_ZTUNNEL) >= 1
        # The ztunnel's mark is what lets it through, as for IPv4.
        net.connect(node.netns, guarded.ip6, 8080, mark=MARK_ZTUNNEL).close()
    finally:
        server.close()


def test_ipv6_from_the_uplink_goes_to_the_hbone_and_plaintext_listeners(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    node_a, node_b = bpf_lab.node("node-a"), bpf_lab.node("node-b")
    target = bpf_lab.new_pod("node-a", "dst6")
    zt = ztunnel(node_a, HBONE_PORT, INBOUND_PLAINTEXT_PORT, family=V6)
    plane = bpf_lab.plane(node_a)
    plane.enroll(target.ip, ipv6=[target.ip6])

    with net.connect(node_b.netns, target.ip6, HBONE_PORT) as sock:
        got = zt.next()
        assert net.roundtrip(sock) == b"veil"
    assert (got.port, got.sockname, got.peername[0]) == (
        HBONE_PORT,
        (target.ip6, HBONE_PORT),
        node_b.underlay_ip6,
    )
    # Plain TCP from the other node to any other port goes to the plaintext
    # listener. (From node-b itself: a pod made here a moment earlier reuses the
    # address of one an earlier test removed, and the path back to it can lag.)
    with net.connect(node_b.netns, target.ip6, 80, timeout=10.0):
        got = zt.next()
    assert (got.port, got.sockname, got.peername[0]) == (
        INBOUND_PLAINTEXT_PORT,
        (target.ip6, 80),
        node_b.underlay_ip6,
    )
    assert plane.pod(target.ip).counters.inbound_redirected == 2


def test_ipv6_entries_follow_enroll_mark_and_unenroll(bpf_lab: Any) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "lst6")
    ip6 = ipaddress.IPv6Address(pod.ip6)
    extra = ipaddress.IPv6Address("fd00:244:1::ff:1")

    def addrs() -> set[str]:
        return {str(a.ip) for a in plane.maps_dump().pod_addrs if a.ifindex == state.ifindex}

    def local6() -> set[str]:
        return {str(e.ip) for e in plane.maps_dump().local_ips if e.ip.version == 6}

    state = plane.enroll(pod.ip, ipv6=[ip6, extra])
    assert set(state.ipv6) == {ip6, extra}
    assert addrs() == {pod.ip, pod.ip6, str(extra)}
    assert {pod.ip6, str(extra)} <= local6()

    state = plane.enroll(pod.ip, ipv6=[ip6])  # one address went away
    assert state.ipv6 == (ip6,) and str(extra) not in addrs() | local6()

    state = plane.mark_local_pod(pod.ip, ipv6=[ip6])  # still anti-spoofed, no longer a target
    assert not state.enrolled and state.ipv6 == (ip6,)
    assert pod.ip6 not in local6()

    plane.enroll(pod.ip, ipv6=[ip6])
    assert plane.unenroll(pod.ip)
    assert addrs() == set() and pod.ip6 not in local6()
