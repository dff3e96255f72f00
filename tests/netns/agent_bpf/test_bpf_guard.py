"""No identity spoofing, and nothing but the ztunnel talks TCP to an enrolled pod."""

from __future__ import annotations

from typing import Any

from agent.bpf import DropReason
from lab.apps import serve
from node.dataplane import MARK_ZTUNNEL, OUTBOUND_PORT
from tests.support.polling import wait_for


def test_spoofed_source_is_dropped_and_counted(
    bpf_lab: Any, ztunnel: Any, net: Any, packets: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    liar = bpf_lab.new_pod("node-a", "spf")
    victim = bpf_lab.new_pod("node-a", "vic")
    zt = ztunnel(node, OUTBOUND_PORT)
    plane.enroll(liar.ip)
    plane.enroll(victim.ip)

    # A SYN claiming the victim's address would make the ztunnel act as the victim.
    net.send_raw(liar.netns, packets("syn", victim.ip, "10.244.2.77", 40000, 80), "10.244.2.77")
    # UDP too: every IPv4 packet from an enrolled pod must carry its own address.
    net.send_raw(
        liar.netns, packets("udp", victim.ip, "10.244.2.77", 40001, 53, b"q"), "10.244.2.77"
    )

    def spoofs() -> int:
        return int(plane.pod(liar.ip).counters.drop_count(DropReason.SPOOFED_SOURCE))

    assert wait_for(lambda: spoofs() == 2)
    zt.assert_idle()
    assert plane.pod(victim.ip).counters.dropped == 0

    # The same SYN with the pod's own address is captured normally.
    with net.connect(liar.netns, "10.244.2.77", 80):
        assert zt.next().peername[0] == liar.ip


def test_egress_guard_admits_only_the_ztunnel(bpf_lab: Any, net: Any) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    guarded = bpf_lab.new_pod("node-a", "grd")
    server = serve(guarded.netns, "echo", 8080)
    try:
        # Reachable from the node before enrollment.
        net.connect(node.netns, guarded.ip, 8080).close()
        plane.enroll(guarded.ip)

        # Unmarked traffic from the node itself is not the ztunnel.
        assert net.connect_fails(node.netns, guarded.ip, 8080)
        assert plane.pod(guarded.ip).counters.drop_count(DropReason.NOT_ZTUNNEL) >= 1

        # SO_MARK = MARK_ZTUNNEL on a locally generated socket survives to the
        # veth's tc egress hook: this is what the guard relies on.
        with net.connect(node.netns, guarded.ip, 8080, mark=MARK_ZTUNNEL) as sock:
            assert net.roundtrip(sock) == b"veil"

        # Kubelet probes come from an allow-listed node address.
        plane.set_probe_source(node.underlay_ip)
        try:
            with net.connect(node.netns, guarded.ip, 8080) as sock:
                assert net.roundtrip(sock) == b"veil"
        finally:
            plane.set_probe_source(None)
        assert net.connect_fails(node.netns, guarded.ip, 8080)
    finally:
        server.stop()


def test_egress_guard_stops_a_pod_whose_steering_is_bypassed(bpf_lab: Any, net: Any) -> None:
    # A local pod without Veil's ingress program (as if steering were skipped)
    # is forwarded straight to the enrolled pod; the guard must still stop it.
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    guarded = bpf_lab.new_pod("node-a", "gd2")
    bypasser = bpf_lab.new_pod("node-a", "byp")
    server = serve(guarded.netns, "echo", 8080)
    try:
        plane.enroll(guarded.ip)
        assert plane.pod(bypasser.ip) is None
        assert net.connect_fails(bypasser.netns, guarded.ip, 8080)
        assert plane.pod(guarded.ip).counters.drop_count(DropReason.NOT_ZTUNNEL) >= 1
    finally:
        server.stop()


def test_udp_passes_the_guard_by_default(bpf_lab: Any, net: Any) -> None:
    # DNS replies are not the ztunnel's business (ICMP: see test_bpf_icmp).
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "udp")
    plane.enroll(pod.ip)
    receiver = net.udp_server(pod.netns, 5353)
    try:
        net.udp_send(node.netns, pod.ip, 5353, b"dns-ish")
        data, _ = receiver.recvfrom(100)
        assert data == b"dns-ish"
    finally:
        receiver.close()
    assert plane.pod(pod.ip).counters.dropped == 0
