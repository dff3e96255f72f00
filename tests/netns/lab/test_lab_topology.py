"""The lab builds real nodes and pods, they can talk, and teardown leaves nothing behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab import LabError, Topology, cleanup_stale, in_netns
from lab.apps import echo_roundtrip, serve, sink_bytes, source_bytes, whoami
from lab.netns import list_netns


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _ns_of(prefix: str) -> list[str]:
    return [n for n in list_netns() if n.startswith(prefix + "-")]


def test_standard_lab_builds_fast_with_prefixed_names() -> None:
    start = time.monotonic()
    topo = Topology.standard(nodes=2, pods_per_node=3)
    try:
        elapsed = time.monotonic() - start
        assert elapsed < 2.0, f"building 2x3 took {elapsed:.2f}s"
        expected = {topo.underlay_netns} | {n.netns for n in topo.nodes.values()}
        expected |= {p.netns for p in topo.pods}
        assert len(expected) == 9
        assert set(_ns_of(topo.prefix)) == expected
        assert topo.node("node-a").netns == f"{topo.prefix}-node-a"
        assert topo.pod("pod-2", "node-b").netns == f"{topo.prefix}-node-b-pod-2"
        for pod in topo.pods:
            assert len(pod.host_veth) <= 15
        links = topo.run(topo.node("node-a"), ["ip", "-o", "link"]).stdout.decode()
        assert all(p.host_veth in links for p in topo.node("node-a").pods)
    finally:
        topo.close()
    assert _ns_of(topo.prefix) == []


def test_pod_network_setup(lab: Topology) -> None:
    pod = lab.pod("pod-0", "node-a")
    neigh = lab.run(pod, ["ip", "neigh", "show", "169.254.1.1"]).stdout.decode()
    assert pod.host_veth_mac in neigh and "PERMANENT" in neigh
    routes = lab.run(pod, ["ip", "route"]).stdout.decode()
    assert "default via 169.254.1.1 dev eth0" in routes and "onlink" in routes
    addrs = lab.run(pod, ["ip", "-o", "addr"]).stdout.decode()
    assert f"{pod.ip}/32" in addrs
    node_routes = lab.run(pod.node, ["ip", "route"]).stdout.decode()
    assert f"{pod.ip} dev {pod.host_veth}" in node_routes
    assert f"{lab.node('node-b').pod_cidr} via {lab.node('node-b').underlay_ip}" in node_routes


def test_pods_are_dual_stack(lab: Topology) -> None:
    pod = lab.pod("pod-0", "node-a")
    assert pod.ip6 == "fd00:244:1::" + pod.ip.rsplit(".", 1)[1]  # same host part as IPv4
    addrs = lab.run(pod, ["ip", "-o", "-6", "addr"]).stdout.decode()
    assert f"{pod.ip6}/128" in addrs and "tentative" not in addrs  # no DAD: usable at once
    neigh = lab.run(pod, ["ip", "-6", "neigh", "show", "fe80::1"]).stdout.decode()
    assert pod.host_veth_mac in neigh and "PERMANENT" in neigh
    routes = lab.run(pod, ["ip", "-6", "route"]).stdout.decode()
    assert "default via fe80::1 dev eth0" in routes
    node_b = lab.node("node-b")
    node_routes = lab.run(pod.node, ["ip", "-6", "route"]).stdout.decode()
    assert f"{pod.ip6} dev {pod.host_veth}" in node_routes
    assert f"{node_b.pod_cidr6} via {node_b.underlay_ip6}" in node_routes
    # The underlay namespace stays IPv4 only.
    assert "inet6" not in lab.run(lab.underlay_netns, ["ip", "-o", "addr"]).stdout.decode()


@pytest.mark.parametrize("target", [("node-b", "pod-1"), ("node-a", "pod-2")])
def test_pod_to_pod_over_ipv6_without_steering(lab: Topology, target: tuple[str, str]) -> None:
    client = lab.pod("pod-0", "node-a")
    server = lab.pod(target[1], target[0])
    with in_netns(server.netns):
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with listener:
        listener.bind(("::", 7006))
        listener.listen(1)
        listener.settimeout(3.0)
        with in_netns(client.netns):
            conn = socket.create_connection((server.ip6, 7006), timeout=3.0)
        with conn:
            accepted, peer = listener.accept()
            with accepted:
                assert peer[0] == client.ip6  # the real client address, across nodes too


@pytest.mark.parametrize("target", [("node-b", "pod-1"), ("node-a", "pod-2")])
def test_pod_to_pod_echo_without_steering(lab: Topology, target: tuple[str, str]) -> None:
    client = lab.pod("pod-0", "node-a")
    server = lab.pod(target[1], target[0])
    with serve(server.netns, "echo", 7000):
        payload = b"lab payload " * 1000
        with client.connect_tcp(server.ip, 7000) as sock:
            assert echo_roundtrip(sock, payload) == payload


def test_server_sees_real_client_ip_across_nodes(lab: Topology) -> None:
    client = lab.pod("pod-1", "node-a")
    server = lab.pod("pod-0", "node-b")
    proc = lab.start_app(server, "whoami", 8080)
    with client.connect_tcp(server.ip, 8080) as sock:
        seen = whoami(sock)
    assert (seen.peer_ip, seen.local_ip, seen.local_port) == (client.ip, server.ip, 8080)
    proc.close()
    assert proc.returncode is not None


def test_pod_reaches_controller_ip_on_underlay(lab: Topology) -> None:
    pod = lab.pod("pod-2", "node-b")
    with serve(lab.underlay_netns, "whoami", 15012, host=lab.controller_ip):
        with pod.connect_tcp(lab.controller_ip, 15012) as sock:
            assert whoami(sock).peer_ip == pod.ip
        node = lab.node("node-a")
        with in_netns(node.netns), socket.create_connection((lab.controller_ip, 15012), 3) as s:
            assert whoami(s).peer_ip == node.underlay_ip


def test_sink_and_source_apps_as_processes(lab: Topology) -> None:
    client = lab.pod("pod-0", "node-a")
    server = lab.pod("pod-0", "node-b")
    lab.start_app(server, "sink", 9000)
    lab.start_app(server, "source", 9001)
    with client.connect_tcp(server.ip, 9000) as sock:
        assert sink_bytes(sock, 3_000_000) == 3_000_000
    with client.connect_tcp(server.ip, 9001) as sock:
        assert source_bytes(sock, 2_000_000) == 2_000_000


def test_underlay_does_not_forward_pod_traffic() -> None:
    # Without the node's own routes, a pod CIDR is unreachable even though the
    # underlay namespace knows where it lives: it must not route for nodes.
    with Topology() as topo:
        a = topo.add_node("node-a")
        b = topo.add_node("node-b")
        pa = topo.add_pod(a, "client")
        pb = topo.add_pod(b, "server")
        topo.build()
        assert topo.run(topo.underlay_netns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout == (
            b"0\n"
        )
        topo.run(a, ["ip", "route", "del", b.pod_cidr])
        topo.run(a, ["ip", "route", "add", "default", "via", topo.controller_ip])
        with serve(pb.netns, "echo", 7000), pytest.raises(OSError):
            pa.connect_tcp(pb.ip, 7000, timeout=0.5)


def test_pods_added_after_build_are_wired(topology: Callable[..., Topology]) -> None:
    topo = topology()
    node_a = topo.add_node("node-a")
    topo.build()
    node_b = topo.add_node("node-b")
    late = topo.add_pod(node_b, "late", "10.244.2.50")
    early = topo.add_pod(node_a, "early")
    with serve(late.netns, "whoami", 80), early.connect_tcp(late.ip, 80) as sock:
        assert whoami(sock).peer_ip == early.ip


def test_remove_pod_deletes_its_namespace_link_and_route(lab: Topology) -> None:
    pod = lab.pod("pod-1", "node-a")
    lab.start_app(pod, "echo", 7000)
    lab.remove_pod(pod)
    assert pod.netns not in list_netns()
    node_links = lab.run(pod.node, ["ip", "-o", "link"]).stdout.decode()
    assert pod.host_veth not in node_links
    assert pod.ip not in lab.run(pod.node, ["ip", "route"]).stdout.decode()
    assert [p.name for p in pod.node.pods] == ["pod-0", "pod-2"]
    again = lab.add_pod(pod.node, "pod-1")
    assert again.ip == pod.ip  # the address is free again
    with (
        serve(again.netns, "echo", 7000),
        lab.pod("pod-0", "node-b").connect_tcp(again.ip, 7000) as s,
    ):
        assert echo_roundtrip(s, b"back") == b"back"


def test_in_netns_moves_only_the_current_thread(lab: Topology) -> None:
    pod = lab.pod("pod-0", "node-a")
    seen: list[str] = []
    go, done = threading.Event(), threading.Event()

    def _ns() -> str:
        return Path("/proc/thread-self/ns/net").resolve().name

    def other() -> None:
        go.wait(5)
        seen.append(_ns())
        done.set()

    home = _ns()
    threading.Thread(target=other).start()
    with in_netns(pod.netns):
        inside = _ns()
        sock = socket.socket()
        go.set()
        assert done.wait(5)
        # A thread started inside is born in the pod (clone copies namespaces).
        born: list[str] = []
        child = threading.Thread(target=lambda: born.append(_ns()))
        child.start()
        child.join(5)
    assert _ns() == home
    assert inside != home and seen == [home] and born == [inside]
    # The socket stays in the pod: binding the pod IP works outside the block.
    sock.bind((pod.ip, 0))
    sock.close()
    with pytest.raises(LabError, match="does not exist"), in_netns(f"{lab.prefix}-nope"):
        pass


def test_popen_close_escalates_to_sigkill(lab: Topology, tmp_path: Path) -> None:
    code = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = lab.popen(lab.node("node-a"), [sys.executable, "-c", code], log_path=tmp_path / "p.log")
    deadline = time.monotonic() + 10
    while "up" not in proc.log_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.monotonic()
    assert proc.close(grace=0.3) == -9
    assert time.monotonic() - start < 3
    assert proc.close() == -9  # idempotent


def test_close_removes_everything_even_when_the_body_raises(tmp_path: Path) -> None:
    links_before = _root_links()
    topo = Topology()
    with pytest.raises(RuntimeError, match="boom"), topo:
        node = topo.add_node("node-a")
        pod = topo.add_pod(node, "pod-0")
        topo.build()
        proc = topo.start_app(pod, "echo", 7000)
        # A process started behind the topology's back inside a lab netns.
        stray = subprocess.Popen(["ip", "netns", "exec", pod.netns, "sleep", "60"])
        raise RuntimeError("boom")
    assert _ns_of(topo.prefix) == []
    assert _root_links() == links_before
    assert proc.poll() is not None
    assert stray.wait(5) is not None
    assert not Path(f"/run/veil-lab/{topo.prefix}.json").exists()
    topo.close()  # idempotent
    with pytest.raises(LabError, match="closed"):
        topo.add_node("again")


_CRASHING_RUN = textwrap.dedent(
    """
    import os, subprocess
    from lab import Topology
    topo = Topology.standard(nodes=1, pods_per_node=1)
    subprocess.Popen(["ip", "netns", "exec", topo.pods[0].netns, "sleep", "60"],
                     start_new_session=True, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    print(topo.prefix, flush=True)
    os._exit(1)
    """
)


def test_cleanup_stale_removes_dead_labs_and_keeps_live_ones(lab: Topology) -> None:
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_RUN], capture_output=True, text=True, timeout=30
    )
    dead_prefix = crashed.stdout.strip()
    assert len(_ns_of(dead_prefix)) == 3, crashed.stderr
    removed = cleanup_stale()
    assert set(_ns_of(dead_prefix)) == set()
    assert len([n for n in removed if n.startswith(dead_prefix)]) == 3
    assert len(_ns_of(lab.prefix)) == 9  # the live lab of this process is untouched
