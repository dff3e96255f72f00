"""Steering on real veths: pods into :15001, the uplink into :15008/:15006, fail closed.

The listeners belong to ZtunnelStandIn (see conftest): marked, transparent,
bound to 0.0.0.0 like the ztunnel's. Addresses outside the lab's pods are
never reached: a captured connection ends at the stand-in.
"""

from __future__ import annotations

from typing import Any

from agent.bpf import DropReason
from lab.apps import serve
from node.dataplane import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT

# An address in node-b's pod CIDR where no pod exists: only capture can answer it.
NOWHERE = "10.244.2.250"


def test_enrolled_pod_is_captured_with_original_destination_and_client_ip(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "cap")
    zt = ztunnel(node, OUTBOUND_PORT)
    plane.enroll(pod.ip)

    with net.connect(pod.netns, NOWHERE, 8080) as sock:
        got = zt.next()
        assert got.port == OUTBOUND_PORT
        assert got.sockname == (NOWHERE, 8080)  # the original destination
        assert got.peername[0] == pod.ip  # the real client address
        assert net.roundtrip(sock, b"through the ztunnel") == b"through the ztunnel"

    counters = plane.pod(pod.ip).counters
    assert counters.outbound_redirected == 1
    assert counters.established >= 2  # handshake ACK and data went to the accepted socket
    assert counters.dropped == 0


def test_node_service_on_the_destination_port_does_not_win(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    # A node process listening on 0.0.0.0:<port> matches the original tuple; the
    # program must skip listeners and still hand the SYN to the ztunnel.
    node = bpf_lab.node("node-a")
    pod = bpf_lab.new_pod("node-a", "svc")
    zt = ztunnel(node, OUTBOUND_PORT)
    local_service = serve(node.netns, "echo", 9911)
    try:
        bpf_lab.plane(node).enroll(pod.ip)
        with net.connect(pod.netns, node.underlay_ip, 9911):
            got = zt.next()
        assert got.sockname == (node.underlay_ip, 9911)
    finally:
        local_service.stop()


def test_uplink_hbone_and_plaintext_go_to_their_listeners(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    node_a, node_b = bpf_lab.node("node-a"), bpf_lab.node("node-b")
    target = bpf_lab.new_pod("node-a", "dst")
    zt = ztunnel(node_a, HBONE_PORT, INBOUND_PLAINTEXT_PORT)
    bpf_lab.plane(node_a).enroll(target.ip)

    with net.connect(node_b.netns, target.ip, HBONE_PORT) as sock:
        got = zt.next()
        assert net.roundtrip(sock) == b"veil"
    assert got.port == HBONE_PORT
    assert got.sockname == (target.ip, HBONE_PORT)
    assert got.peername[0] == node_b.underlay_ip

    with net.connect(node_b.netns, target.ip, 80):
        got = zt.next()
    assert got.port == INBOUND_PLAINTEXT_PORT
    assert got.sockname == (target.ip, 80)

    # A pod on another node (not enrolled there) reaches it through the uplink too.
    stranger = bpf_lab.new_pod("node-b", "far")
    with net.connect(stranger.netns, target.ip, 443):
        got = zt.next()
    assert (got.port, got.sockname, got.peername[0]) == (
        INBOUND_PLAINTEXT_PORT,
        (target.ip, 443),
        stranger.ip,
    )
    assert bpf_lab.plane(node_a).pod(target.ip).counters.inbound_redirected == 3


def test_no_listener_drops_the_syn_and_never_bypasses(bpf_lab: Any, ztunnel: Any, net: Any) -> None:
    node = bpf_lab.node("node-a")
    pod = bpf_lab.new_pod("node-a", "nol")
    server_pod = bpf_lab.new_pod("node-b", "srv")
    server = serve(server_pod.netns, "echo", 8080)
    try:
        # Reachable before enrollment: the drop below is the program's doing.
        net.connect(pod.netns, server_pod.ip, 8080).close()
        plane = bpf_lab.plane(node)
        plane.enroll(pod.ip)
        assert net.connect_fails(pod.netns, server_pod.ip, 8080)
        assert plane.pod(pod.ip).counters.drop_count(DropReason.NO_LISTENER) >= 1

        # A listener without the ztunnel mark is not the ztunnel: still dropped.
        impostor = ztunnel(node, OUTBOUND_PORT, mark=0)
        assert net.connect_fails(pod.netns, server_pod.ip, 8080)
        impostor.assert_idle()
        assert plane.pod(pod.ip).counters.drop_count(DropReason.FOREIGN_LISTENER) >= 1
    finally:
        server.stop()


def test_non_enrolled_pods_are_untouched_except_towards_enrolled_pods(
    bpf_lab: Any, ztunnel: Any, net: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    plain = bpf_lab.new_pod("node-a", "pln")
    enrolled = bpf_lab.new_pod("node-a", "enr")
    remote = bpf_lab.new_pod("node-b", "rem")
    zt = ztunnel(node, OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT)
    plane.enroll(enrolled.ip)
    state = plane.mark_local_pod(plain.ip)
    assert not state.enrolled and state.ingress is not None and state.egress is None

    server = serve(remote.netns, "whoami", 8080)
    try:
        with net.connect(plain.netns, remote.ip, 8080) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert plain.ip.encode() in sock.recv(4096)  # direct, real source, no capture
        zt.assert_idle()
    finally:
        server.stop()

    with net.connect(plain.netns, enrolled.ip, 80):
        got = zt.next()
    assert (got.port, got.sockname, got.peername[0]) == (
        INBOUND_PLAINTEXT_PORT,
        (enrolled.ip, 80),
        plain.ip,
    )
    assert plane.pod(enrolled.ip).counters.inbound_redirected == 1
    assert plane.pod(plain.ip).counters.dropped == 0
