"""``veilctl monitor --type drop`` on a real agent: drop records from the BPF ring buffer.

Each drop the programs report carries its reason, the pod's veth and the
packet tuple; the agent resolves the pod and streams it to subscribers over
its status socket. Packets are crafted inside the lab's pod namespaces (raw
IPv4 + TCP), so nothing leaves the lab.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.bpf.programs import DROP_EVENT_BURST, DROP_EVENT_RATE
from agent.status import StatusClient
from lab import in_netns
from node.bpf import possible_cpus

from .conftest import AgentNode

SERVER = "10.244.2.10"
SPOOFED = "10.244.1.99"
_SYN = 0x02


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4 TCP SYN with correct checksums."""
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, _SYN, 64240, 0, 0)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, socket.IPPROTO_TCP, 0,
                     saddr, daddr)  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


@contextlib.contextmanager
def raw_sender(netns: str) -> Iterator[socket.socket]:
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with sock:
        yield sock


@dataclass
class Subscription:
    """One ``/monitor`` stream read by a thread until it has been idle for a while."""

    env: AgentNode
    query: str = ""
    idle: float = 3.0
    events: list[dict[str, Any]] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Subscription:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.subscribed.wait(10.0), f"no subscription:\n{self.env.log()[-2000:]}"
        return self

    def _read(self) -> None:
        client = StatusClient(str(self.env.socket), timeout=5.0)
        for event in client.stream(f"/monitor?follow=1{self.query}", idle_timeout=self.idle):
            if event.get("type") == "subscribed":
                self.subscribed.set()
            self.events.append(event)

    def __exit__(self, *exc: object) -> None:
        assert self._thread is not None
        self._thread.join(self.idle + 10.0)

    def drops(self) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("type") == "drop"]

    def wait_drop(self, timeout: float, **want: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.drops():
                if all(e.get(k) == v for k, v in want.items()):
                    return e
            time.sleep(0.01)
        raise AssertionError(f"no drop matching {want} within {timeout}s: {self.events}")


def test_spoofed_packet_streams_reason_pod_and_tuple(agent_node: AgentNode) -> None:
    env = agent_node
    client = env.pod("client")
    with Subscription(env) as everything, Subscription(env, "&pod=shop/other") as other:
        with raw_sender(client.netns) as raw:
            sent = time.monotonic()
            raw.sendto(tcp_syn(SPOOFED, SERVER, 40001, 8080), (SERVER, 0))
        event = everything.wait_drop(1.0, reason="spoofed_source", src=f"{SPOOFED}:40001")
        latency = time.monotonic() - sent
    assert latency < 1.0
    assert event["pod"] == "shop/client"
    assert event["namespace"] == "shop"
    assert event["ip"] == client.ip
    assert event["veth"] == client.host_veth
    assert event["dst"] == f"{SERVER}:8080"
    assert (event["src_ip"], event["src_port"], event["dst_ip"], event["dst_port"]) == (
        SPOOFED, 40001, SERVER, 8080,
    )  # fmt: skip
    assert (event["protocol"], event["family"], event["program"]) == ("tcp", "ipv4", "pod_ingress")
    # The filtered subscriber saw none of shop/client's drops.
    assert not [e for e in other.drops() if e.get("pod") == "shop/client"], other.events


def test_unmarked_syn_to_an_enrolled_pod_is_reported_by_the_egress_guard(
    agent_node: AgentNode,
) -> None:
    """A SYN from the node itself that skipped the ztunnel: no listener is involved, the
    egress guard drops it, and the stream says which pod it was for."""
    env = agent_node
    client = env.pod("client")
    with Subscription(env, "&namespace=shop&reason=not_ztunnel") as sub:
        with in_netns(env.node.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(0.3)
            with contextlib.suppress(OSError):
                sock.connect((client.ip, 9))
        event = sub.wait_drop(1.0, dst=f"{client.ip}:9")
    assert (event["reason"], event["pod"], event["program"]) == (
        "not_ztunnel", "shop/client", "pod_egress",
    )  # fmt: skip
    assert all(e["reason"] == "not_ztunnel" for e in sub.drops())


def test_a_flood_is_rate_limited_but_every_drop_is_counted(agent_node: AgentNode) -> None:
    env = agent_node
    client = env.pod("client")
    flood = 5000

    def spoofed_count() -> int:
        return int(env.pods()["shop/client"]["drops"].get("spoofed_source", 0))

    before = spoofed_count()
    with Subscription(env, "&pod=shop/client", idle=2.0) as sub, raw_sender(client.netns) as raw:
        t0 = time.monotonic()
        for i in range(flood):
            raw.sendto(tcp_syn(SPOOFED, SERVER, 20000 + i % 20000, 8080), (SERVER, 0))
        elapsed = time.monotonic() - t0
        # Trickle a few more after the buckets refilled: each CPU's next
        # record reports what its bucket swallowed.
        for i in range(20):
            time.sleep(0.03)
            raw.sendto(tcp_syn(SPOOFED, SERVER, 45000 + i, 8080), (SERVER, 0))
    drops = [e for e in sub.drops() if e["src_ip"] == SPOOFED]
    lost = sum(e["count"] for e in sub.events if e.get("type") == "lost")
    # Every packet is counted in the map, whatever the stream showed.
    assert spoofed_count() - before >= flood + 20
    # The stream is bounded by the per-CPU token bucket (plus the trickle).
    bound = possible_cpus() * (DROP_EVENT_BURST + DROP_EVENT_RATE * (elapsed + 1.0)) + 20
    assert 0 < len(drops) <= bound, (len(drops), bound, elapsed)
    assert len(drops) < flood
    # What the bucket swallowed was reported as lost, never silently.
    assert lost > 0, json.dumps(sub.events[-5:])
    assert len(drops) + lost <= flood + 20
