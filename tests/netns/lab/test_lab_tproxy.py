"""nftables TPROXY steering sends pods' TCP where a ztunnel would expect it.

A tiny IP_TRANSPARENT relay stands in for the ztunnel (a test app, not a Veil
component): it shows what a listener sees and proves that the reply paths of
spoofed-source connections work, on one node and across nodes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from lab import LabNode, Topology, in_netns
from lab.apps import echo_roundtrip, listen, serve, whoami
from lab.tproxy import TPROXY_TABLE, disable_tproxy, enable_tproxy
from node.dataplane import MARK_ZTUNNEL

Addr = tuple[str, int]
# Given (original destination, client address) and the header line that came
# in (b"" unless the relay expects one), return (source address to bind or
# None, target, header line to send onwards).
Plan = Callable[[Addr, Addr, bytes], tuple[Addr | None, Addr, bytes]]


class Listener:
    """Accepts on a transparent listener in a node and records what it saw."""

    def __init__(self, node: LabNode, port: int) -> None:
        with in_netns(node.netns):
            self.sock = listen("0.0.0.0", port, transparent=True)
        self.sock.settimeout(5)

    def accept(self) -> tuple[socket.socket, Addr, Addr]:
        conn, _ = self.sock.accept()
        return conn, conn.getsockname(), conn.getpeername()

    def close(self) -> None:
        self.sock.close()


class Relay:
    """Accept, connect onwards per ``plan`` (IP_TRANSPARENT, marked), pump bytes."""

    def __init__(self, node: LabNode, port: int, plan: Plan, header: bool = False) -> None:
        self.node, self.plan, self.header = node, plan, header
        with in_netns(node.netns):
            self.sock = listen("0.0.0.0", port, transparent=True)
        self.seen: list[tuple[Addr, Addr]] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._start(self._accept_loop)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._start(self._handle, conn)

    def _handle(self, conn: socket.socket) -> None:
        try:
            dst, peer = conn.getsockname(), conn.getpeername()
            self.seen.append((dst, peer))
            line = b""
            if self.header:
                while not line.endswith(b"\n"):
                    line += conn.recv(1)
            src, target, preamble = self.plan(dst, peer, line)
            with in_netns(self.node.netns):
                out = socket.socket()
            out.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK_ZTUNNEL)
            if src is not None:
                out.bind((src[0], 0))
            out.settimeout(5)
            out.connect(target)
            out.sendall(preamble)
            self._start(_pump, conn, out)
            _pump(out, conn)
        except BaseException as exc:
            self.errors.append(exc)
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for thread in self._threads:
            thread.join(2)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@contextlib.contextmanager
def relay(node: LabNode, port: int, plan: Plan, header: bool = False) -> Iterator[Relay]:
    r = Relay(node, port, plan, header)
    try:
        yield r
    finally:
        r.close()
    assert not r.errors, r.errors


def _nft(lab: Topology, node: LabNode) -> str:
    return lab.run(node, ["nft", "list", "ruleset"]).stdout.decode()


@pytest.fixture
def steered(lab: Topology) -> Iterator[Topology]:
    """The standard lab with pod-0 and pod-1 enrolled on both nodes; pod-2 stays out."""
    for node in lab.nodes.values():
        enable_tproxy(node, node.pods[:2])
    yield lab


@pytest.mark.parametrize("dst", [("node-b", "pod-0", 80), (None, "192.0.2.10", 443)])
def test_outbound_lands_on_15001_with_original_destination(
    steered: Topology, dst: tuple[str | None, str, int]
) -> None:
    client = steered.pod("pod-0", "node-a")
    ip = steered.pod(dst[1], dst[0]).ip if dst[0] else dst[1]
    listener = Listener(client.node, 15001)
    try:
        with client.connect_tcp(ip, dst[2]) as sock:
            conn, local, peer = listener.accept()
            with conn:
                assert local == (ip, dst[2])
                assert peer == (client.ip, sock.getsockname()[1])
                sock.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert sock.recv(4) == b"pong"
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("client_node", "port", "lands_on"),
    [("node-a", 80, 15006), ("node-a", 15008, 15008), ("node-b", 80, 15006)],
)
def test_inbound_to_local_enrolled_pod_lands_on_inbound_ports(
    steered: Topology, client_node: str, port: int, lands_on: int
) -> None:
    # pod-2 is not enrolled: from node-a it arrives on node-b's uplink; on
    # node-b itself it comes straight from its own veth.
    client = steered.pod("pod-2", client_node)
    server = steered.pod("pod-1", "node-b")
    listener = Listener(server.node, lands_on)
    try:
        with client.connect_tcp(server.ip, port):
            conn, local, peer = listener.accept()
            conn.close()
        assert local == (server.ip, port)
        assert peer[0] == client.ip
    finally:
        listener.close()


def test_non_enrolled_pod_is_not_steered(steered: Topology) -> None:
    client = steered.pod("pod-2", "node-a")
    remote = steered.pod("pod-2", "node-b")
    listener = Listener(client.node, 15001)
    try:
        with serve(remote.netns, "whoami", 80), client.connect_tcp(remote.ip, 80) as sock:
            assert whoami(sock).peer_ip == client.ip
        with (
            serve(steered.underlay_netns, "echo", 81),
            client.connect_tcp(steered.controller_ip, 81) as sock,
        ):
            assert echo_roundtrip(sock, b"direct") == b"direct"
        listener.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_fail_closed_without_a_listener(steered: Topology) -> None:
    client = steered.pod("pod-0", "node-a")
    remote = steered.pod("pod-2", "node-b")  # not enrolled: it would answer directly
    with serve(remote.netns, "echo", 80), pytest.raises(TimeoutError):
        client.connect_tcp(remote.ip, 80, timeout=0.5)
    uplink_client = steered.pod("pod-2", "node-b")
    with serve(client.netns, "echo", 80), pytest.raises(TimeoutError):
        uplink_client.connect_tcp(client.ip, 80, timeout=0.5)


def test_disable_restores_direct_traffic(steered: Topology) -> None:
    client = steered.pod("pod-0", "node-a")
    server = steered.pod("pod-0", "node-b")
    node = client.node
    assert TPROXY_TABLE in _nft(steered, node)
    disable_tproxy(node)
    disable_tproxy(steered.node("node-b"))
    disable_tproxy(node)  # idempotent
    assert TPROXY_TABLE not in _nft(steered, node)
    assert "lookup 150" not in steered.run(node, ["ip", "rule"]).stdout.decode()
    assert steered.run(node, ["ip", "route", "show", "table", "150"]).stdout == b""
    with serve(server.netns, "whoami", 80), client.connect_tcp(server.ip, 80) as sock:
        assert whoami(sock).peer_ip == client.ip


def test_same_node_spoofed_source_reply_reaches_the_relay(steered: Topology) -> None:
    # pod-0 -> pod-1 on node-a, both enrolled. The relay connects to pod-1 from
    # pod-0's IP; pod-1's SYN-ACK enters through its (enrolled) veth and must
    # reach the relay's transparent socket, not be steered to :15001 again.
    a, b = steered.pod("pod-0", "node-a"), steered.pod("pod-1", "node-a")
    with (
        serve(b.netns, "whoami", 80),
        relay(a.node, 15001, lambda dst, peer, line: ((peer[0], 0), dst, b"")) as r,
        a.connect_tcp(b.ip, 80) as sock,
    ):
        seen = whoami(sock)
    assert (seen.peer_ip, seen.local_ip) == (a.ip, b.ip)
    assert len(r.seen) == 1


def test_cross_node_path_through_both_relays(steered: Topology) -> None:
    # node-a: :15001 relay -> B:15008 from the node (marked), sending
    # "<dst ip> <dst port> <client ip>" first (HBONE's CONNECT, minus TLS);
    # node-b: :15008 relay connects to B from the client's IP. The whoami
    # server must see A's address: the data path the ztunnel relies on.
    a, b = steered.pod("pod-0", "node-a"), steered.pod("pod-1", "node-b")

    def outbound(dst: Addr, peer: Addr, line: bytes) -> tuple[Addr | None, Addr, bytes]:
        return None, (dst[0], 15008), f"{dst[0]} {dst[1]} {peer[0]}\n".encode()

    def inbound(dst: Addr, peer: Addr, line: bytes) -> tuple[Addr | None, Addr, bytes]:
        ip, port, client = line.decode().split()
        return (client, 0), (ip, int(port)), b""

    with (
        serve(b.netns, "whoami", 8080),
        relay(b.node, 15008, inbound, header=True) as in_relay,
        relay(a.node, 15001, outbound) as out_relay,
        a.connect_tcp(b.ip, 8080) as sock,
    ):
        seen = whoami(sock)
    assert (seen.peer_ip, seen.local_ip, seen.local_port) == (a.ip, b.ip, 8080)
    assert out_relay.seen[0][1][0] == a.ip
    # node-b's relay saw node-a's address: the outbound relay connected from the node.
    assert in_relay.seen[0] == ((b.ip, 15008), (a.node.underlay_ip, in_relay.seen[0][1][1]))


def test_enable_rejects_pods_of_another_node(steered: Topology) -> None:
    from lab import LabError

    with pytest.raises(LabError, match="do not run on node"):
        enable_tproxy(steered.node("node-a"), [steered.pod("pod-0", "node-b")])


def test_enable_with_no_enrolled_pods_then_change_the_set(lab: Topology) -> None:
    node = lab.node("node-a")
    client, server = lab.pod("pod-0", "node-a"), lab.pod("pod-0", "node-b")
    enable_tproxy(node, [])  # empty sets are valid; nothing is steered
    with serve(server.netns, "whoami", 80), client.connect_tcp(server.ip, 80) as sock:
        assert whoami(sock).peer_ip == client.ip
    enable_tproxy(node, [client])  # re-enabling replaces the table atomically
    listener = Listener(node, 15001)
    try:
        with client.connect_tcp(server.ip, 80):
            conn, local, _ = listener.accept()
            conn.close()
        assert local == (server.ip, 80)
    finally:
        listener.close()
    rules = lab.run(node, ["ip", "rule"]).stdout.decode()
    assert rules.count("lookup 150") == 1
