"""IPv6 through the mesh on the dual-stack lab (issue 9 §2).

Every lab pod has an IPv6 address (fd00:244:<node>::<host>) besides its IPv4
one, and the registry lists both (see :mod:`tests.support.ztunnel_lab`). These
tests prove that IPv6 gets the same treatment as IPv4: steered into the
ztunnel, tunnelled over mTLS, authorized, and never a way around the mesh.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator

from lab.apps import echo_roundtrip, serve, whoami
from lab.capture import UnderlayCapture
from lab.netns import in_netns
from node.dataplane import HBONE_PORT
from tests.support.ztunnel_lab import APP_PORT, NODE_A, NODE_B, Lab, connect_from, expect_refused

WHOAMI = 8081  # payments runs echo on 8080 and whoami on 8081
VIP6 = "fd00:96::20"
NODE_SERVICE_PORT = 9099
MARKER = b"VEIL-IPV6-PLAINTEXT-MARKER-7c2e51"


def v6_segments_on(cap: UnderlayCapture, port: int) -> int:
    return sum(1 for s in cap.segments() if ":" in s.src and port in (s.sport, s.dport))


def test_ipv6_cross_node_goes_through_mtls_and_shows_the_real_client(lab: Lab) -> None:
    checkout6, payments6 = lab.ip6("checkout"), lab.ip6("payments")
    with UnderlayCapture(lab.mesh.topo) as cap:
        with connect_from(lab, "checkout", payments6, WHOAMI) as s:
            who = whoami(s)
        payload = MARKER + os.urandom(1 << 20) + MARKER
        with connect_from(lab, "checkout", payments6, APP_PORT) as s:
            echoed = echo_roundtrip(s, payload)
        assert cap.wait_for(lambda c: c.tls_records_seen() > 20)
    assert who.peer_ip == checkout6, "payments did not see checkout's own IPv6 address"
    assert who.local_ip == payments6
    assert echoed == payload
    assert not cap.contains(MARKER), "IPv6 plaintext crossed the underlay"
    # The tunnel itself runs over IPv6 (pod address to pod address, port 15008),
    # and no segment of the application ports crossed in either family.
    assert v6_segments_on(cap, HBONE_PORT) > 0
    assert not cap.tcp_ports_seen() & {APP_PORT, WHOAMI}
    lab.wait_log(NODE_B, f'"src":"[{checkout6}]:')


def test_ipv6_service_vip_reaches_the_endpoints_ipv6_address(lab: Lab) -> None:
    with connect_from(lab, "checkout", VIP6, 80) as s:
        who = whoami(s)
    assert (who.local_ip, who.local_port) == (lab.ip6("payments"), WHOAMI)
    assert who.peer_ip == lab.ip6("checkout")


def test_ipv6_same_node_enforces_policy_without_tls(lab: Lab) -> None:
    with UnderlayCapture(lab.mesh.topo) as cap:
        with connect_from(lab, "checkout", lab.ip6("other"), APP_PORT) as s:
            who = whoami(s)
        expect_refused(lab, "intruder", lab.ip6("other"), APP_PORT)
    assert (who.peer_ip, who.local_ip) == (lab.ip6("checkout"), lab.ip6("other"))
    assert HBONE_PORT not in cap.tcp_connection_ports()
    assert APP_PORT not in cap.tcp_ports_seen()


def test_ipv6_destination_outside_the_mesh_is_passed_through(lab: Lab) -> None:
    server = lab.serve("legacy-server", "whoami", 9090)
    try:
        with connect_from(lab, "checkout", lab.ip6("legacy-server"), 9090) as s:
            who = whoami(s)
    finally:
        server.stop()
    # Direct from node-a's own IPv6 address: the destination has no ztunnel.
    assert who.peer_ip == lab.mesh.topo.node(NODE_A).underlay_ip6
    assert who.local_ip == lab.ip6("legacy-server")


def test_ipv6_client_not_allowed_by_policy_is_reset(lab: Lab) -> None:
    # intruder is enrolled but payments' ALLOW policy names only checkout.
    expect_refused(lab, "intruder", lab.ip6("payments"), WHOAMI)
    lab.wait_log(NODE_B, f'"src":"[{lab.ip6("intruder")}]:')
    lab.wait_log(NODE_A, '"response_flags":"RBAC"')


def test_strict_refuses_ipv6_plaintext_from_a_pod_outside_the_mesh(lab: Lab) -> None:
    # legacy-client is not enrolled: its IPv6 SYN leaves node-a unsteered and
    # node-b's plaintext listener applies payments' STRICT mode.
    expect_refused(lab, "legacy-client", lab.ip6("payments"), WHOAMI)
    lab.wait_log(NODE_B, "STRICT (mTLS required)")
    # PERMISSIVE inventory still accepts it, over IPv6 too.
    with connect_from(lab, "legacy-client", lab.ip6("inventory"), APP_PORT) as s:
        assert whoami(s).peer_ip == lab.ip6("legacy-client")


def host_link_local(lab: Lab, pod: str) -> str:
    """The link-local address of ``pod``'s host-side veth (in its node)."""
    lab_pod = lab.mesh.pod(pod).lab
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["ip", "-n", lab_pod.node.netns, "-6", "-o", "addr", "show", "dev",
             lab_pod.host_veth, "scope", "link"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        for line in out.splitlines():
            fields = line.split()
            if "inet6" in fields and "tentative" not in fields:
                return fields[fields.index("inet6") + 1].split("/")[0]
        time.sleep(0.1)
    raise AssertionError(f"{lab_pod.host_veth} has no usable link-local address")


def dial_link_local(
    lab: Lab, pod: str, address: str, port: int, source: str | None = None
) -> bytes | str:
    """What ``pod`` gets from ``[address%eth0]:port``: the bytes read, or the error.

    ``source`` binds the pod's own global address first (the kernel would
    otherwise pick the pod's link-local address for a link-local destination).
    """
    with in_netns(lab.mesh.pod(pod).lab.netns):
        scope = socket.if_nametoindex("eth0")
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(3)
        try:
            if source is not None:
                sock.bind((source, 0))
            sock.connect((address, port, 0, scope))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")
            chunks = []
            while data := sock.recv(4096):
                chunks.append(data)
            return b"".join(chunks)
        except OSError as e:
            return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def node_service(lab: Lab, node: str) -> Iterator[None]:
    """A whoami bound to ``[::]`` in the node's namespace (like kubelet or a node exporter)."""
    server = serve(lab.mesh.topo.node(node).netns, "whoami", NODE_SERVICE_PORT, host="::")
    try:
        yield
    finally:
        server.stop()


def test_enrolled_pod_cannot_reach_a_node_service_on_the_link_local_gateway(lab: Lab) -> None:
    with node_service(lab, NODE_A):
        host_ll = host_link_local(lab, "checkout")
        # The service answers on the link: a pod outside the mesh reaches it
        # (so the refusals below are the mesh's doing, not a broken test).
        plain = dial_link_local(
            lab, "legacy-client", host_link_local(lab, "legacy-client"), NODE_SERVICE_PORT
        )
        assert isinstance(plain, bytes) and plain.startswith(b"HTTP/1.1 200"), plain
        # From the pod's link-local source address (what the kernel picks) the
        # pod's anti-spoofing drops it; from its own fd00:: address the SYN is
        # steered to the ztunnel, which refuses a destination that only exists
        # on the pod's link.
        for address in ("fe80::1", host_ll):
            for source in (None, lab.ip6("checkout")):
                got = dial_link_local(lab, "checkout", address, NODE_SERVICE_PORT, source)
                assert not (isinstance(got, bytes) and got), (
                    f"enrolled checkout ({source or 'link-local source'}) reached the node "
                    f"service at [{address}%eth0]: {got!r}"
                )
    lab.wait_log(NODE_A, f"destination only exists on the pod's own link or host: {host_ll}")
