"""The drop stream from the kernel side: records in the pinned ring buffer, and pin upgrades.

The agent's fan-out is tested with a real agent in tests/netns/agent_daemon;
here the programs' records are read straight from the ring with
:class:`DropEventReader`, as the agent does.
"""

from __future__ import annotations

import socket
import time
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from agent.bpf import Dataplane, DropReason
from agent.bpf.events import DropEvent, DropEventReader, DropProgram
from lab import in_netns

REMOTE4 = "10.244.2.200"  # node-b's pod range, no pod: only the data path decides
REMOTE6 = "fd00:244:2::fb"


def _ifindex(netns: str, ifname: str) -> int:
    with in_netns(netns):
        return socket.if_nametoindex(ifname)


def _wait_event(reader: DropEventReader, timeout: float = 1.0, **want: Any) -> DropEvent:
    deadline = time.monotonic() + timeout
    seen: list[DropEvent] = []
    while time.monotonic() < deadline:
        for e in reader.read():
            seen.append(e)
            if all(getattr(e, k) == v for k, v in want.items()):
                return e
        time.sleep(0.01)
    raise AssertionError(f"no drop record matching {want} within {timeout}s; saw {seen}")


def test_no_listener_drops_are_recorded_with_their_tuple_in_both_families(
    bpf_lab: Any, net: Any
) -> None:
    node = bpf_lab.node("node-a")
    plane = bpf_lab.plane(node)
    pod = bpf_lab.new_pod("node-a", "evt")
    plane.enroll(pod.ip, ipv6=[pod.ip6])
    veth = _ifindex(node.netns, pod.host_veth)
    with DropEventReader.open(plane.layout) as reader:
        reader.skip()  # what other tests left in the ring
        assert net.connect_fails(pod.netns, REMOTE4, 8080, timeout=0.3)
        e4 = _wait_event(reader, reason=DropReason.NO_LISTENER, dst=IPv4Address(REMOTE4))
        assert e4.src == IPv4Address(pod.ip) and e4.dport == 8080 and e4.sport > 0
        assert (e4.ifindex, e4.program, e4.protocol_label) == (
            veth, DropProgram.POD_INGRESS, "tcp",
        )  # fmt: skip
        assert net.connect_fails(pod.netns, REMOTE6, 8443, timeout=0.3)
        e6 = _wait_event(reader, reason=DropReason.NO_LISTENER, dst=IPv6Address(REMOTE6))
        assert e6.src == IPv6Address(pod.ip6) and e6.dport == 8443 and e6.family == 10
        assert e6.ifindex == veth
        assert e6.to_dict()["dst"] == f"[{REMOTE6}]:8443"


def test_pins_without_the_drop_maps_are_upgraded_in_place(
    topology: Any, fresh_pin_dir: Any, net: Any
) -> None:
    """An agent that predates the drop stream left pins without drop_events/drop_limit:
    the new agent compiles, keeps every older map (entries and counters), adds the two
    maps and swaps the programs; the next start reuses the whole set."""
    topo = topology()
    node = topo.add_node("node-a")
    topo.add_node("node-b")
    pod = topo.add_pod(node, "old-0")
    topo.build()
    pin_dir = fresh_pin_dir(topo, node)
    with in_netns(node.netns):
        plane = Dataplane.open(pin_dir)
    with plane:
        plane.setup_node(node.uplink)
        plane.enroll(pod.ip)
    assert net.connect_fails(pod.netns, REMOTE4, 8080, timeout=0.3)
    for name in ("drop_events", "drop_limit"):
        (pin_dir / name).unlink()  # the older pin set

    with in_netns(node.netns):
        plane = Dataplane.open(pin_dir)
    with plane:
        assert not plane.reused_pins
        state = plane.pod(pod.ip)
        assert state is not None and state.protected
        assert state.counters.drop_count(DropReason.NO_LISTENER) >= 1  # the map survived
        assert (pin_dir / "drop_events").exists() and (pin_dir / "drop_limit").exists()
        with DropEventReader.open(plane.layout) as reader:
            reader.skip()
            assert net.connect_fails(pod.netns, REMOTE4, 8081, timeout=0.3)
            e = _wait_event(reader, reason=DropReason.NO_LISTENER, dport=8081)
            assert e.ifindex == _ifindex(node.netns, pod.host_veth)

    with in_netns(node.netns):
        plane = Dataplane.open(pin_dir)
    with plane:
        assert plane.reused_pins
        plane.uninstall()
