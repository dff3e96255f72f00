"""The whole mesh as an operator runs it: the demo, and fail-closed with the real ztunnel.

These build :class:`lab.mesh.LabMesh` from ``examples/registry.yaml``:
the controller, and on each node ``veil node join``, ``veil ztunnel run`` and
``veil agent run`` (eBPF redirection), exactly as ``make demo`` does.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.apps import TcpServer, listen
from lab.demo import DEFAULT_REGISTRY, run_demo
from lab.mesh import LabMesh
from lab.netns import in_netns

PORT = 8080


class CountingEcho:
    """An echo server in a pod that counts the connections it accepted."""

    def __init__(self, netns: str) -> None:
        self.accepted = 0
        self._lock = threading.Lock()
        with in_netns(netns):
            sock = listen("0.0.0.0", PORT)
        self.server = TcpServer(sock, self._handle).start()

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.accepted += 1
        while data := conn.recv(65536):
            conn.sendall(data)


def roundtrip(mesh: LabMesh, client: str, ip: str, timeout: float = 3.0) -> bytes:
    with mesh.in_pod(client):
        sock = socket.create_connection((ip, PORT), timeout=timeout)
    with sock:
        sock.sendall(b"ping")
        return sock.recv(16)


def no_listener_drops(mesh: LabMesh, node: str, pod_ip: str) -> int:
    for row in mesh.veilctl_json(node, "pods"):
        if row.get("ip") == pod_ip:
            return int((row.get("drops") or {}).get("no_listener", 0))
    raise AssertionError(f"veilctl pods on {node} has no row for {pod_ip}")


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LabMesh, dict[str, CountingEcho]]]:
    work = tmp_path_factory.mktemp("mesh-e2e")
    with LabMesh(DEFAULT_REGISTRY, workdir=work) as m:
        m.start()
        servers = {
            name: CountingEcho(m.pod(name).lab.netns) for name in ("payments", "legacy-server")
        }
        try:
            yield m, servers
        finally:
            for s in servers.values():
                s.server.stop()


def test_ztunnel_down_fails_closed_and_recovers(
    mesh: tuple[LabMesh, dict[str, CountingEcho]],
) -> None:
    m, servers = mesh
    payments, legacy = m.pod("payments"), m.pod("legacy-server")
    assert roundtrip(m, "checkout", payments.ip) == b"ping"
    before = servers["payments"].accepted
    drops_before = no_listener_drops(m, "node-a", m.pod("checkout").ip)

    m.stop_ztunnel("node-a")
    try:
        with pytest.raises(OSError):
            roundtrip(m, "checkout", payments.ip, timeout=1.5)
        # The SYN was dropped at checkout's veth: payments never saw a connection.
        assert servers["payments"].accepted == before
        assert no_listener_drops(m, "node-a", m.pod("checkout").ip) > drops_before
        # A pod outside the mesh is unaffected.
        assert roundtrip(m, "legacy-client", legacy.ip) == b"ping"
    finally:
        m.start_ztunnel("node-a")
        m.wait_ztunnel_ready("node-a")

    deadline = time.monotonic() + 15
    while True:
        try:
            assert roundtrip(m, "checkout", payments.ip) == b"ping"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert servers["payments"].accepted > before


def test_veilctl_verify_is_clean_on_a_running_mesh(
    mesh: tuple[LabMesh, dict[str, CountingEcho]],
) -> None:
    m, _ = mesh
    for node in m.topo.nodes:
        code, text = m.veilctl(node, "verify")
        assert code == 0, text


def test_the_demo_passes_and_cleans_up(tmp_path: Path) -> None:
    lines: list[str] = []
    assert run_demo(DEFAULT_REGISTRY, keep=False, out=lines.append) == 0, "\n".join(lines)
    assert lines[-1].startswith("\nveil demo: PASS"), lines[-1]
    assert "[FAIL]" not in "\n".join(lines)
