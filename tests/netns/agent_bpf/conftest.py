"""Fixtures for the eBPF data-plane tests: a shared two-node lab with Veil loaded on node-a.

Compiling the programs costs a second or more, so one session lab (node-a
with Veil, node-b as the rest of the cluster) is shared by the tests; each
test adds its own pods with unique names. Every node gets its own pin
directory, because bpffs is not per network namespace. Tests that need a
pristine pin directory (restart, uninstall) build their own lab.

The ztunnel stand-in is :class:`ZtunnelStandIn`: a test application, not a
Veil component, that listens like the ztunnel does (0.0.0.0, IP_TRANSPARENT,
SO_MARK = MARK_ZTUNNEL), records getsockname()/getpeername() of each
accepted connection and echoes bytes back.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.bpf import Dataplane
from agent.bpf.dataplane import uninstall_node
from lab import LabNode, LabPod, Topology, in_netns
from lab.netns import list_netns
from node.dataplane import MARK_ZTUNNEL

TEST_PIN_ROOT = Path("/sys/fs/bpf/veil-test")
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
ETH_P_IPV6 = 0x86DD


def pin_dir_for(topo: Topology, node: LabNode) -> Path:
    return TEST_PIN_ROOT / f"{topo.prefix}-{node.name}"


def remove_stale_pin_dirs() -> None:
    """Pin directories of labs whose namespaces are gone (a crashed run) are removed."""
    if not TEST_PIN_ROOT.exists():
        return
    live = {name.split("-", 1)[0] for name in list_netns()}
    for entry in TEST_PIN_ROOT.iterdir():
        if entry.is_dir() and entry.name.split("-", 1)[0] not in live:
            uninstall_pins_only(entry)


def uninstall_pins_only(pin_dir: Path) -> None:
    for pin in pin_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):
            pin.unlink()
    with contextlib.suppress(OSError):
        pin_dir.rmdir()


@dataclass(frozen=True)
class Accepted:
    """One connection the stand-in accepted: what the ztunnel would learn from the socket."""

    port: int
    sockname: tuple[str, int]
    peername: tuple[str, int]


@dataclass
class ZtunnelStandIn:
    """Transparent, marked listeners in a node namespace; echoes and records connections."""

    netns: str
    ports: tuple[int, ...]
    mark: int = MARK_ZTUNNEL
    # AF_INET: 0.0.0.0 with IP_TRANSPARENT; AF_INET6: [::] (IPv6 only) with IPV6_TRANSPARENT.
    family: int = socket.AF_INET
    accepted: queue.Queue[Accepted] = field(default_factory=queue.Queue)
    _listeners: list[socket.socket] = field(default_factory=list)
    _conns: list[socket.socket] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ZtunnelStandIn:
        with in_netns(self.netns):
            for port in self.ports:
                sock = socket.socket(self.family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                if self.mark:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
                sock.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", port))
                sock.listen(64)
                sock.settimeout(0.2)
                self._listeners.append(sock)
        for sock in self._listeners:
            thread = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _accept_loop(self, listener: socket.socket) -> None:
        port = listener.getsockname()[1]
        while not self._stop.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            try:
                conn.settimeout(5.0)
                sockname = conn.getsockname()[:2]
            except OSError:  # reset before we looked: nothing to record
                continue
            self.accepted.put(Accepted(port, sockname, peer[:2]))
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def next(self, timeout: float = 3.0) -> Accepted:
        return self.accepted.get(timeout=timeout)

    def assert_idle(self) -> None:
        assert self.accepted.empty(), f"unexpected connection: {self.accepted.get_nowait()}"

    def stop(self) -> None:
        self._stop.set()
        for sock in [*self._listeners, *self._conns]:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(1.0)


@dataclass
class BpfLab:
    """The session lab: a topology and one open Dataplane per node."""

    topo: Topology
    planes: dict[str, Dataplane]
    _names: Iterator[int] = field(default_factory=itertools.count)

    def node(self, name: str) -> LabNode:
        return self.topo.node(name)

    def plane(self, node: LabNode) -> Dataplane:
        return self.planes[node.name]

    def new_pod(self, node: str, tag: str) -> LabPod:
        """A fresh pod with a name no other test uses."""
        return self.topo.add_pod(self.topo.node(node), f"{tag}{next(self._names)}")


@pytest.fixture(scope="session")
def bpf_lab() -> Iterator[BpfLab]:
    remove_stale_pin_dirs()
    topo = Topology()
    planes: dict[str, Dataplane] = {}
    try:
        topo.add_node("node-a")
        topo.add_node("node-b")
        topo.build()
        # Veil runs on node-a; node-b plays the rest of the cluster (remote
        # clients and servers). The restart test loads its own pin directory
        # next to this one, so two pin directories coexist on the machine.
        node = topo.node("node-a")
        with in_netns(node.netns):
            plane = Dataplane.open(pin_dir_for(topo, node))
        planes[node.name] = plane
        plane.setup_node(node.uplink)
        yield BpfLab(topo, planes)
    finally:
        try:
            for name, plane in planes.items():
                with contextlib.suppress(Exception):
                    plane.uninstall()
                node = topo.nodes[name]
                with in_netns(node.netns):
                    uninstall_node(pin_dir_for(topo, node))
        finally:
            topo.close()
            with contextlib.suppress(OSError):
                TEST_PIN_ROOT.rmdir()


@pytest.fixture
def ztunnel() -> Iterator[Callable[..., ZtunnelStandIn]]:
    """Factory: ``ztunnel(node, 15001, 15006)`` starts marked transparent listeners there."""
    started: list[ZtunnelStandIn] = []

    def factory(
        node: LabNode, *ports: int, mark: int = MARK_ZTUNNEL, family: int = socket.AF_INET
    ) -> ZtunnelStandIn:
        standin = ZtunnelStandIn(node.netns, ports, mark, family).start()
        started.append(standin)
        return standin

    yield factory
    for standin in started:
        standin.stop()


@pytest.fixture
def fresh_pin_dir() -> Iterator[Callable[[Topology, LabNode], Path]]:
    """Pin dirs for tests that load their own Dataplane; removed afterwards whatever happens."""
    made: list[Path] = []

    def factory(topo: Topology, node: LabNode) -> Path:
        path = pin_dir_for(topo, node)
        made.append(path)
        return path

    yield factory
    for path in made:
        if path.exists():
            uninstall_pins_only(path)
    with contextlib.suppress(OSError):
        TEST_PIN_ROOT.rmdir()


class Net:
    """Socket helpers that act from inside a namespace."""

    @staticmethod
    def connect(
        netns: str, ip: str, port: int, *, timeout: float = 3.0, mark: int = 0
    ) -> socket.socket:
        with in_netns(netns):
            sock = socket.socket(_family(ip), socket.SOCK_STREAM)
        try:
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.settimeout(timeout)
            sock.connect((ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def connect_fails(
        netns: str, ip: str, port: int, *, timeout: float = 1.0, mark: int = 0
    ) -> bool:
        """True when no connection is established within ``timeout`` (SYN dropped or refused)."""
        try:
            sock = Net.connect(netns, ip, port, timeout=timeout, mark=mark)
        except OSError:
            return True
        sock.close()
        return False

    @staticmethod
    def roundtrip(sock: socket.socket, payload: bytes = b"veil") -> bytes:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = sock.recv(len(payload) - len(got))
            if not data:
                break
            got += data
        return got

    @staticmethod
    def udp_server(netns: str, port: int) -> socket.socket:
        with in_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
        sock.settimeout(1.0)
        return sock

    @staticmethod
    def udp_send(netns: str, ip: str, port: int, payload: bytes = b"veil") -> None:
        with in_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.sendto(payload, (ip, port))

    @staticmethod
    def tcp_server(netns: str, ip: str, port: int) -> socket.socket:
        """A listening socket (either family) inside ``netns``; accept() it yourself."""
        with in_netns(netns):
            sock = socket.socket(_family(ip), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(16)
        sock.settimeout(1.0)
        return sock

    @staticmethod
    def send_frame(netns: str, ifname: str, frame: bytes) -> None:
        """Send a raw Ethernet frame out of ``ifname`` inside ``netns`` (AF_PACKET)."""
        with in_netns(netns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with sock:
            sock.bind((ifname, 0))
            sock.send(frame)

    @staticmethod
    def ipv6_frame(
        src_mac: str, dst_mac: str, src: str, dst: str, nexthdr: int, l4: bytes
    ) -> bytes:
        return ipv6_frame(src_mac, dst_mac, src, dst, nexthdr, l4)

    @staticmethod
    def tcp_syn6(src: str, dst: str, sport: int, dport: int) -> bytes:
        return tcp_syn6(src, dst, sport, dport)

    @staticmethod
    def icmp(type_: int, code: int, body: bytes) -> bytes:
        return icmp(type_, code, body)

    @staticmethod
    def send_raw(netns: str, packet: bytes, dst: str) -> None:
        """Send a hand-built IPv4 packet (any source address) from inside ``netns``."""
        with in_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with sock:
            sock.sendto(packet, (dst, 0))


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(l4),
        0x1234,
        0x4000,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + l4


def tcp_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4 TCP SYN with correct checksums."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    return ipv4_packet(src, dst, socket.IPPROTO_TCP, tcp)


def udp_datagram(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 UDP datagram (checksum 0: optional in IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return ipv4_packet(src, dst, socket.IPPROTO_UDP, udp)


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def ipv6_frame(
    src_mac: str, dst_mac: str, src: str, dst: str, nexthdr: int, l4: bytes, hop_limit: int = 64
) -> bytes:
    """An Ethernet frame carrying an IPv6 packet; ``l4`` needs its checksum already."""
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(l4),
        nexthdr,
        hop_limit,
        socket.inet_pton(socket.AF_INET6, src),
        socket.inet_pton(socket.AF_INET6, dst),
    )
    eth = _mac_bytes(dst_mac) + _mac_bytes(src_mac) + struct.pack("!H", ETH_P_IPV6)
    return eth + header + l4


def _ipv6_pseudo(src: str, dst: str, nexthdr: int, length: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!I3xB", length, nexthdr)
    )


def tcp_syn6(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The L4 part of an IPv6 TCP SYN with a correct checksum (wrap it with ipv6_frame)."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)
    csum = _checksum(_ipv6_pseudo(src, dst, socket.IPPROTO_TCP, len(tcp)) + tcp)
    return tcp[:16] + struct.pack("!H", csum) + tcp[18:]


def icmp(type_: int, code: int, body: bytes) -> bytes:
    """An ICMPv4 message with its checksum."""
    raw = struct.pack("!BBH", type_, code, 0) + body
    return raw[:2] + struct.pack("!H", _checksum(raw)) + raw[4:]


@pytest.fixture
def net() -> type[Net]:
    return Net


@pytest.fixture
def packets() -> Callable[..., bytes]:
    """Packet builders: ``packets("syn", src, dst, sport, dport)`` or ``("udp", ..., payload)``."""

    def build(kind: str, *args: object) -> bytes:
        if kind == "syn":
            return tcp_syn(*args)  # type: ignore[arg-type]
        return udp_datagram(*args)  # type: ignore[arg-type]

    return build
