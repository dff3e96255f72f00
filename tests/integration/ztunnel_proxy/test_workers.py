"""``veil ztunnel run --workers 2`` as a process: both workers serve, a killed
worker is restarted while the other keeps serving, metrics and the admin API
are merged over the workers, and SIGTERM drains them all.

node-b (payments) is the multi-worker process; node-a (checkout) runs in
process. Each tunnel here goes through its own HBONE pool, so each is a new
TCP connection to node-b's HBONE port with its own source port, and the
kernel's SO_REUSEPORT hash spreads them over the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.support.controller import REPO, clean_env, veil_argv
from tests.support.loopback_mesh import (
    CHECKOUT,
    CHECKOUT_IP,
    OTHER,
    PAYMENTS,
    PAYMENTS_IP,
    App,
    Mesh,
    ztunnel_ports,
    ztunnel_run_argv,
)
from ztunnel.app import Ztunnel
from ztunnel.hbone import ConnectRefused, HboneClientPool, HboneConfig, relay
from ztunnel.proxy.sockets import Address, connect_upstream

GRACE = 3.0
TUNNELS = 12


@dataclass
class Node:
    proc: asyncio.subprocess.Process
    log: Path
    ports: dict[str, int]

    def url(self, path: str, listener: str = "admin") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"


@pytest.fixture
async def node_b(mesh: Mesh, tmp_path: Path) -> AsyncIterator[Node]:
    ports = ztunnel_ports(PAYMENTS_IP)
    state = tmp_path / "node-b-state"
    await mesh.controller.join("node-b", state)
    argv = ztunnel_run_argv("node-b", state, PAYMENTS_IP, ports, GRACE, "--workers", "2")
    log = tmp_path / "ztunnel-b.log"
    with log.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, env=clean_env(), stderr=err, start_new_session=True
        )
    node = Node(proc, log, ports)
    try:
        yield node
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)


async def wait_ready(http: aiohttp.ClientSession, node: Node) -> None:
    for _ in range(300):
        assert node.proc.returncode is None, node.log.read_text()
        try:
            async with http.get(node.url("/healthz/ready", "ready")) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("node-b not ready:\n" + node.log.read_text())


async def dump(http: aiohttp.ClientSession, node: Node) -> dict[str, object]:
    async with http.get(node.url("/config_dump")) as resp:
        assert resp.status == 200
        data: dict[str, object] = await resp.json()
        return data


async def metric(http: aiohttp.ClientSession, node: Node, line_start: str) -> float | None:
    async with http.get(node.url("/metrics", "metrics")) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def veilctl_connections(node: Node) -> list[dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli.veilctl",
        "--ztunnel-admin", f"127.0.0.1:{node.ports['admin']}",
        "connections", "-o", "json",
        cwd=REPO, env=clean_env(), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    data = json.loads(out)
    assert isinstance(data, list)
    return data


async def wait_serving(http: aiohttp.ClientSession, node: Node, count: int) -> None:
    serving = 'veil_ztunnel_workers{state="serving"}'
    for _ in range(150):
        if await metric(http, node, serving) == count:
            return
        await asyncio.sleep(0.1)
    assert await metric(http, node, serving) == count, node.log.read_text()


@dataclass
class Tunnel:
    pool: HboneClientPool
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task[object]

    async def echo(self, data: bytes) -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(data)), 10)

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        await self.pool.shutdown(0.1)


async def open_tunnel(node_a: Ztunnel, node: Node, app: App) -> Tunnel:
    """A CONNECT through node-b's HBONE port on a TCP connection of its own."""

    async def dial(ip: str, port: int) -> socket.socket:
        return await connect_upstream(Address(ip, port), mark=None, timeout=5)

    pool = HboneClientPool(node_a.trust_bundle, connect=dial, config=HboneConfig())
    cert = await node_a.certs.fetch(CHECKOUT, timeout=10)
    stream = await pool.open_stream(
        cert,
        PAYMENTS_IP,
        node.ports["hbone"],
        PAYMENTS,
        (PAYMENTS_IP, app.port),
        forwarded_for=(CHECKOUT_IP, 40000),
    )
    mine, theirs = socket.socketpair()
    task: asyncio.Task[object] = asyncio.create_task(relay(stream, theirs))
    reader, writer = await asyncio.open_connection(sock=mine)
    hello = await asyncio.wait_for(reader.readline(), 10)
    assert hello == f"peer {CHECKOUT_IP}\n".encode()
    return Tunnel(pool, reader, writer, task)


async def expect_denied(node_a: Ztunnel, node: Node, app: App) -> None:
    """other may not call payments: node-b's worker refuses the CONNECT."""
    pool = HboneClientPool(node_a.trust_bundle, config=HboneConfig())
    try:
        cert = await node_a.certs.fetch(OTHER, timeout=10)
        with pytest.raises(ConnectRefused):
            await pool.open_stream(
                cert, PAYMENTS_IP, node.ports["hbone"], PAYMENTS, (PAYMENTS_IP, app.port)
            )
    finally:
        await pool.shutdown(0.1)


async def workers_serving(
    http: aiohttp.ClientSession, node: Node, tunnels: list[Tunnel]
) -> set[int]:
    data = await dump(http, node)
    conns = data["connections"]
    assert isinstance(conns, list) and len(conns) == len(tunnels), conns
    return {int(c["worker"]) for c in conns}


async def test_two_workers_serve_and_one_is_restarted_after_a_crash(
    mesh: Mesh, app: App, node_b: Node
) -> None:
    node_a = await mesh.start_node("node-a", CHECKOUT_IP)
    tunnels: list[Tunnel] = []
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, node_b)
            # Ready as soon as one worker serves; the second follows.
            await wait_serving(http, node_b, 2)

            tunnels = [await open_tunnel(node_a, node_b, app) for _ in range(TUNNELS)]
            for t in tunnels:
                assert await t.echo(b"ping") == b"ping"
            pids = await workers_serving(http, node_b, tunnels)
            assert len(pids) == 2, "both workers should have accepted connections"
            # Counters are summed over the workers (one open per tunnel).
            opened = await metric(
                http, node_b, "veil_ztunnel_active_connections" + '{direction="inbound"}'
            )
            assert opened == TUNNELS

            # veilctl reads the merged connections as it reads a single process's.
            listed = await veilctl_connections(node_b)
            assert len(listed) == TUNNELS
            assert {c["direction"] for c in listed} == {"inbound"}

            # A deny in a worker reaches the supervisor's /denies.
            await expect_denied(node_a, node_b, app)
            for _ in range(50):
                async with http.get(node_b.url("/denies")) as resp:
                    denies = await resp.json()
                if denies["total"]:
                    break
                await asyncio.sleep(0.1)
            assert denies["total"] == 1
            assert denies["denies"][0]["src_identity"] == str(OTHER)

            # Kill one worker: its connections die, the other's keep working,
            # and new connections are served at once.
            victim = min(pids)
            os.kill(victim, signal.SIGKILL)
            survivors: list[Tunnel] = []
            for t in tunnels:
                try:
                    assert await t.echo(b"still") == b"still"
                    survivors.append(t)
                except (OSError, TimeoutError, asyncio.IncompleteReadError):
                    await t.close()
            assert survivors, "the surviving worker's tunnels should keep working"
            tunnels = survivors
            fresh = [await open_tunnel(node_a, node_b, app) for _ in range(4)]
            for t in fresh:
                assert await t.echo(b"new") == b"new"
            tunnels += fresh

            # The killed worker is restarted and serves again.
            await wait_serving(http, node_b, 2)
            assert await metric(http, node_b, "veil_ztunnel_worker_restarts_total") == 1
            more = [await open_tunnel(node_a, node_b, app) for _ in range(TUNNELS)]
            tunnels += more
            pids_after = await workers_serving(http, node_b, tunnels)
            assert victim not in pids_after
            assert len(pids_after) == 2, "the restarted worker should serve new connections"

            # SIGTERM: not ready, listeners closed at once, live tunnels
            # still carry bytes until the grace period ends; then exit 0.
            keep = tunnels.pop()
            for t in tunnels:
                await t.close()
            tunnels = [keep]
            node_b.proc.send_signal(signal.SIGTERM)
            for _ in range(100):
                try:
                    async with http.get(node_b.url("/healthz/ready", "ready")) as resp:
                        if resp.status != 200:
                            break
                except aiohttp.ClientConnectionError:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            with pytest.raises(OSError):
                socket.create_connection((PAYMENTS_IP, node_b.ports["hbone"]), timeout=1).close()
            assert await keep.echo(b"during drain") == b"during drain"
            code = await asyncio.wait_for(node_b.proc.wait(), GRACE + 20)
            assert code == 0, node_b.log.read_text()
    finally:
        for t in tunnels:
            await t.close()
    log = node_b.log.read_text()
    assert re.search(rf"worker \d \(pid {victim}\) exited unexpectedly", log), log
    assert "grace period ended" in log
    assert "ztunnel stopped" in log


def test_workers_flag_is_validated() -> None:
    import subprocess

    out = subprocess.run(
        [*veil_argv("ztunnel", "run", "--node", "node-b", "--workers", "0")],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "--workers" in out.stderr and "VEIL_ZTUNNEL_WORKERS" in out.stderr
