"""ICMP: echo is a data channel and is dropped by default; errors and ND still pass.

Default-deny tests use the session lab (compiled without the setting); the
allow test loads its own lab and pin directory with allow_icmp_echo, the
node setting behind ``--allow-icmp-echo`` / VEIL_ALLOW_ICMP_ECHO.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from agent.bpf import Dataplane, DataplaneOptions, DropReason
from agent.bpf.dataplane import uninstall_node
from lab import in_netns
from tests.support.polling import wait_for

V4, V6 = socket.AF_INET, socket.AF_INET6


def _ping(netns: str, ip: str) -> bool:
    """One echo request with a 1 s deadline; True when the reply came back."""
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "ping", "-n", "-c", "1", "-W", "1", ip],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return done.returncode == 0


@contextlib.contextmanager
def _icmp_listener(netns: str, family: int) -> Iterator[socket.socket]:
    proto = socket.IPPROTO_ICMP if family == V4 else socket.IPPROTO_ICMPV6
    with in_netns(netns):
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    with sock:
        sock.settimeout(0.2)
        yield sock


def _received_types(sock: socket.socket, family: int, seconds: float = 1.0) -> list[int]:
    """ICMP types seen on a raw socket for ``seconds`` (bounded in time and count)."""
    seen: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(seen) < 1000:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            continue
        # IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
        offset = (data[0] & 0x0F) * 4 if family == V4 else 0
        seen.append(data[offset])
    return seen


def _send_icmp(netns: str, family: int, dst: str, message: bytes) -> None:
    proto = socket.IPPROTO_ICMP if family == V4 else socket.IPPROTO_ICMPV6
    with in_netns(netns):
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    with sock:
        sock.sendto(message, (dst, 0))  # the kernel checksums ICMPv6 itself


def test_echo_to_and_from_an_enrolled_pod_is_dropped_and_counted(bpf_lab: Any) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "png")
    remote = bpf_lab.new_pod("node-b", "pngr")
    for ip in (remote.ip, remote.ip6):
        assert _ping(pod.netns, ip), f"{ip} must answer before enrollment"
    plane.enroll(pod.ip, ipv6=[pod.ip6])

    def echo_drops() -> int:
        return int(plane.pod(pod.ip).counters.drop_count(DropReason.ICMP))

    # From the pod, both families.
    assert not _ping(pod.netns, remote.ip)
    assert not _ping(pod.netns, remote.ip6)
    assert echo_drops() >= 2
    # To the pod, both families: the egress guard drops the requests.
    before = echo_drops()
    assert not _ping(remote.netns, pod.ip)
    assert not _ping(remote.netns, pod.ip6)
    assert wait_for(lambda: echo_drops() >= before + 2)
    # And from the node itself (no ztunnel mark).
    assert not _ping(node.netns, pod.ip6)


def test_icmp_errors_pass_while_echo_does_not(bpf_lab: Any, net: Any) -> None:
    # A remote sender's "fragmentation needed" / "packet too big" must reach the
    # pod (path MTU discovery), an echo request with a payload must not.
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "err")
    remote = bpf_lab.new_pod("node-b", "errr")
    plane.enroll(pod.ip, ipv6=[pod.ip6])

    inner4 = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        1400,
        1,
        0x4000,
        63,
        6,
        0,
        socket.inet_aton(pod.ip),
        socket.inet_aton(remote.ip),
    ) + bytes(8)
    frag_needed = net.icmp(3, 4, struct.pack("!HH", 0, 1280) + inner4)
    echo4 = net.icmp(8, 0, struct.pack("!HH", 7, 1) + b"smuggled payload")
    with _icmp_listener(pod.netns, V4) as listener:
        _send_icmp(remote.netns, V4, pod.ip, frag_needed)
        _send_icmp(remote.netns, V4, pod.ip, echo4)
        seen = _received_types(listener, V4)
    assert 3 in seen and 8 not in seen, seen

    inner6 = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        8,
        6,
        63,
        socket.inet_pton(V6, pod.ip6),
        socket.inet_pton(V6, remote.ip6),
    ) + bytes(8)
    too_big = struct.pack("!BBHI", 2, 0, 0, 1280) + inner6
    echo6 = struct.pack("!BBHHH", 128, 0, 0, 7, 1) + b"smuggled payload"
    with _icmp_listener(pod.netns, V6) as listener:
        _send_icmp(remote.netns, V6, pod.ip6, too_big)
        _send_icmp(remote.netns, V6, pod.ip6, echo6)
        seen = _received_types(listener, V6)
    assert 2 in seen and 128 not in seen, seen
    assert plane.pod(pod.ip).counters.drop_count(DropReason.ICMP) >= 2


def test_the_node_setting_allows_echo(topology: Any, fresh_pin_dir: Any) -> None:
    topo = topology()
    node = topo.add_node("node-a")
    pod = topo.add_pod(node, "pod-0")
    peer = topo.add_pod(node, "pod-1")
    topo.build()
    pin_dir = fresh_pin_dir(topo, node)
    with in_netns(node.netns):
        plane = Dataplane.open(pin_dir, DataplaneOptions(allow_icmp_echo=True))
    try:
        plane.setup_node(node.uplink)
        assert "-DVEIL_ALLOW_ICMP_ECHO=1" in plane.unit.cflags
        plane.enroll(pod.ip, ipv6=[pod.ip6])
        for src, dst in ((pod, peer.ip), (pod, peer.ip6), (peer, pod.ip), (peer, pod.ip6)):
            assert _ping(src.netns, dst), f"{src.name} -> {dst}"
        state = plane.pod(pod.ip)
        assert state is not None and state.counters.drop_count(DropReason.ICMP) == 0
    finally:
        plane.uninstall()
        with in_netns(node.netns):
            uninstall_node(pin_dir)
