"""``veil ztunnel run`` as a process: readiness, admin, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.controller import REPO, clean_env
from tests.support.loopback_mesh import (
    CHECKOUT_IP,
    PAYMENTS_IP,
    App,
    Mesh,
    open_tunnel,
    ztunnel_ports,
    ztunnel_run_argv,
)

GRACE = 3.0


class ZtunnelProcess:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=clean_env(),
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def ports() -> dict[str, int]:
    return ztunnel_ports(PAYMENTS_IP)


@pytest.fixture
def node_b_process(
    mesh: Mesh, tmp_path: Path, ports: dict[str, int]
) -> Iterator[tuple[Path, list[str]]]:
    state = tmp_path / "node-b-state"
    argv = ztunnel_run_argv("node-b", state, PAYMENTS_IP, ports, GRACE)
    yield state, argv


async def ready(http: aiohttp.ClientSession, port: int) -> int:
    try:
        async with http.get(f"http://127.0.0.1:{port}/healthz/ready") as resp:
            return resp.status
    except aiohttp.ClientConnectionError:
        return 0


async def test_run_serves_then_drains_on_sigterm(
    mesh: Mesh,
    app: App,
    tmp_path: Path,
    ports: dict[str, int],
    node_b_process: tuple[Path, list[str]],
) -> None:
    state, argv = node_b_process
    await mesh.controller.join("node-b", state)
    node_a = await mesh.start_node("node-a", CHECKOUT_IP)
    zt = ZtunnelProcess(argv, tmp_path / "ztunnel-b.log")
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(150):
                if await ready(http, ports["ready"]) == 200:
                    break
                assert zt.proc.poll() is None, zt.log.read_text()
                await asyncio.sleep(0.1)
            assert await ready(http, ports["ready"]) == 200, zt.log.read_text()

            # A live tunnel through the process's HBONE listener.
            class NodeB:
                @staticmethod
                def address(name: str) -> tuple[str, int]:
                    return PAYMENTS_IP, ports["hbone"]

            t = await open_tunnel(node_a, NodeB, app.port)  # type: ignore[arg-type]
            assert await t.reader.readline() == f"peer {CHECKOUT_IP}\n".encode()
            async with http.get(f"http://127.0.0.1:{ports['admin']}/config_dump") as resp:
                dump = await resp.json()
            assert [c["direction"] for c in dump["connections"]] == ["inbound"]

            started = time.monotonic()
            zt.proc.send_signal(signal.SIGTERM)
            # Draining: not ready, no new connections, the live one still works.
            for _ in range(50):
                if await ready(http, ports["ready"]) != 200:
                    break
                await asyncio.sleep(0.05)
            assert await ready(http, ports["ready"]) != 200
            with pytest.raises(OSError):
                socket.create_connection((PAYMENTS_IP, ports["hbone"]), timeout=1).close()
            t.writer.write(b"during drain")
            assert await t.reader.readexactly(12) == b"during drain"
            # The peer was told to go away: node-a opens no new stream on it.
            assert all(c.going_away for c in node_a.pool.connections())

            # At the end of the grace period what is left is reset and the
            # process exits cleanly.
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(t.reader.readexactly(1), GRACE + 5)
            code = await asyncio.to_thread(zt.proc.wait, 10)
            elapsed = time.monotonic() - started
            assert code == 0, zt.log.read_text()
            assert GRACE - 0.5 <= elapsed <= GRACE + 6
            t.writer.close()
    finally:
        zt.stop()
    log = zt.log.read_text()
    assert "grace period ended" in log
    assert '"response_flags":"DC"' in log
    assert "ztunnel stopped" in log


async def test_run_refuses_foreign_state_dir(
    mesh: Mesh, tmp_path: Path, node_b_process: tuple[Path, list[str]]
) -> None:
    state, argv = node_b_process
    await mesh.controller.join("node-a", state)  # node-a's credentials, node-b's name
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, env=clean_env(), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    text = err.decode()
    assert "belong to node 'node-a'" in text and "hint:" in text
