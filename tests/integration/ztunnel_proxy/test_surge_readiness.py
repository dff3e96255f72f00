"""Two ztunnels of one node sharing their ports, as during a DaemonSet surge.

The old and the new instance bind the same listener and readiness ports with
SO_REUSEPORT (one process namespace, loopback). The shared HTTP readiness
port may be answered by either of them; each instance's health socket
answers for that instance alone, so the new pod is not ready until its own
listeners are bound, even while the old one is.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.controller import ControllerProcess
from tests.support.loopback_mesh import CHECKOUT_IP, Mesh, node_config
from ztunnel.admin.health_socket import HealthAnswer, HealthUnavailable, query_health
from ztunnel.app import Ztunnel

_HTTP_PROBES = 24


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: unix socket paths must fit in sun_path."""
    d = Path(tempfile.mkdtemp(prefix="vz-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _ask(path: Path, check: str = "ready") -> HealthAnswer:
    return await asyncio.to_thread(query_health, path, check, 2.0)


async def _until_ready(path: Path, timeout: float = 15.0) -> HealthAnswer:
    """Polls one instance's socket until it is ready (certificates arrive
    after the listeners bind)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await _ask(path)
        if answer.ok or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.05)


async def _http_ready(port: int) -> bool:
    """One kubelet-style HTTP probe of the shared readiness port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz/ready HTTP/1.0\r\nHost: probe\r\n\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5.0)
    finally:
        writer.close()
    return b" 200 " in status_line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_each_health_socket_answers_for_its_own_instance(
    mesh: Mesh, controller: ControllerProcess, tmp_path: Path, sock_dir: Path
) -> None:
    old_sock = sock_dir / "old-pod" / "health.sock"
    new_sock = sock_dir / "new-pod" / "health.sock"
    old = await mesh.start_node("node-a", CHECKOUT_IP, health_socket=old_sock)
    hbone_port = old.address("hbone")[1]
    readiness_port = old.ops.addresses["readiness"][1]
    shared: dict[str, Any] = {
        "outbound_port": old.address("outbound")[1],
        "inbound_plaintext_port": old.address("inbound_plaintext")[1],
        "hbone_port": hbone_port,
        "readiness_address": ("127.0.0.1", readiness_port),
    }
    old_answer = await _until_ready(old_sock)
    assert old_answer.ok, old_answer.describe()
    assert (old_sock.stat().st_mode & 0o777) == 0o600
    state = tmp_path / "node-a-state"

    # A surge instance that cannot reach the controller (yet): it binds the
    # shared readiness port but none of its listeners.
    stuck = Ztunnel(
        node_config(
            "node-a", state, CHECKOUT_IP, health_socket=new_sock,
            controller_address=f"127.0.0.1:{_closed_port()}", **shared,
        )
    )  # fmt: skip
    starting = asyncio.ensure_future(stuck.start())
    try:
        deadline = time.monotonic() + 10
        while not new_sock.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        mine = await _ask(new_sock)
        assert not mine.ok and mine.instance != old_answer.instance
        assert any("snapshot" in r for r in mine.reasons), mine.reasons
        assert any("listeners not bound" in r for r in mine.reasons), mine.reasons
        # The ambiguity the socket removes: the shared HTTP port says "ready"
        # for some probes, answered by the old instance.
        http = [await _http_ready(readiness_port) for _ in range(_HTTP_PROBES)]
        assert any(http), "no probe reached the old instance"
        # Each socket still answers for its own instance, every time.
        for _ in range(5):
            assert not (await _ask(new_sock)).ok
            assert (await _ask(old_sock)).instance == old_answer.instance
        assert (await _ask(new_sock, "live")).ok  # liveness has no dependencies
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await stuck.shutdown(grace=0.1)
    assert not new_sock.exists()  # removed at exit: it was still its own

    # The real surge: the new instance syncs, binds beside the old one and
    # becomes ready; the old one drains and leaves.
    new = Ztunnel(node_config("node-a", state, CHECKOUT_IP, health_socket=new_sock, **shared))
    try:
        await new.start(sync_timeout=15)
        assert (await _until_ready(new_sock)).ok
        await old.shutdown(grace=0.2)
        mesh.nodes["node-a"] = new
        assert not old_sock.exists()
        answer = await _ask(new_sock)
        assert answer.ok and answer.instance != old_answer.instance
        # Every new connection on the shared port now reaches the new one.
        for _ in range(5):
            _r, w = await asyncio.open_connection(CHECKOUT_IP, hbone_port)
            w.close()
    finally:
        await new.shutdown(grace=0.2)
    try:
        query_health(new_sock, "ready", 1.0)
    except HealthUnavailable as e:
        assert "no ztunnel health socket" in e.message
    else:
        raise AssertionError("the health socket outlived its ztunnel")


async def test_draining_instance_reports_not_ready_on_its_socket(
    mesh: Mesh, sock_dir: Path
) -> None:
    sock = sock_dir / "pod" / "health.sock"
    zt = await mesh.start_node("node-a", CHECKOUT_IP, health_socket=sock)
    assert (await _until_ready(sock)).ok
    zt.engine.stop_accepting()  # what SIGTERM does first
    answer = await _ask(sock)
    assert not answer.ok and "listeners: draining for shutdown" in answer.reasons
    assert (await _ask(sock, "live")).ok


async def test_a_stale_socket_from_a_previous_container_is_replaced(
    mesh: Mesh, sock_dir: Path
) -> None:
    sock = sock_dir / "pod" / "health.sock"
    sock.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # bound, never listening: what a killed process leaves
    stale.close()
    await mesh.start_node("node-a", CHECKOUT_IP, health_socket=sock)
    assert (await _until_ready(sock)).ok
