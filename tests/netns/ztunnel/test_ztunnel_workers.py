"""A multi-core ztunnel on real steering: ``--workers 2`` in the lab.

With the node's eBPF steering, ``bpf_sk_assign`` picks whichever :15001
listener the lookup returns and the kernel re-selects within the SO_REUSEPORT
group, so connections from one pod are spread over both workers. Killing one
worker leaves the other serving (new connections keep working at once) and
the supervisor starts the killed one again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab.mesh import LabMesh
from node.dataplane import METRICS_PORT
from tests.support.ztunnel_lab import (
    APP_PORT,
    NODE_A,
    NODE_B,
    STEERING,
    Lab,
    connect_from,
    running_lab,
)

CONNECTIONS = 16


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    def both_workers_serve(mesh: LabMesh) -> None:
        # Ready means one worker serves; these tests want both.
        for node in (NODE_A, NODE_B):
            wait_serving(mesh, node, 2)

    with running_lab(
        tmp_path_factory.mktemp("ztunnel-workers-lab"),
        [("payments", "echo", APP_PORT)],
        steering=STEERING,
        extra_ztunnel_args=("--drain-grace-period", "2s"),
        ztunnel_workers=2,
        ready=both_workers_serve,
    ) as the_lab:
        yield the_lab


def wait_serving(mesh: LabMesh, node: str, count: int) -> None:
    want = f'veil_ztunnel_workers{{state="serving"}} {count}'
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = mesh.http_get(node, METRICS_PORT, "/metrics")
        if status == 200 and want in body.decode():
            return
        time.sleep(0.1)
    raise AssertionError(f"{node}: {count} workers not serving after 30s")


def echo(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def outbound_workers(lab: Lab) -> list[int]:
    dump: dict[str, Any] = lab.mesh.config_dump(NODE_A)
    return [int(c["worker"]) for c in dump["connections"] if c.get("direction") == "outbound"]


def worker_by_client_port(lab: Lab) -> dict[int, int]:
    dump: dict[str, Any] = lab.mesh.config_dump(NODE_A)
    return {
        int(str(c["src"]).rsplit(":", 1)[1]): int(c["worker"])
        for c in dump["connections"]
        if c.get("direction") == "outbound"
    }


def wait_outbound(lab: Lab, count: int) -> list[int]:
    deadline = time.monotonic() + 10
    pids = outbound_workers(lab)
    while len(pids) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = outbound_workers(lab)
    return pids


def test_connections_from_one_pod_are_spread_over_both_workers(lab: Lab) -> None:
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(connect_from(lab, "checkout", lab.ip("payments"), APP_PORT))
            for _ in range(CONNECTIONS)
        ]
        for i, s in enumerate(socks):
            assert echo(s, f"hello {i}".encode()) == f"hello {i}".encode()
        pids = wait_outbound(lab, CONNECTIONS)
        assert len(pids) == CONNECTIONS
        assert len(set(pids)) == 2, f"all {CONNECTIONS} connections went to one worker: {pids}"


def test_a_killed_worker_leaves_the_other_serving_and_is_restarted(lab: Lab) -> None:
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(connect_from(lab, "checkout", lab.ip("payments"), APP_PORT))
            for _ in range(CONNECTIONS)
        ]
        for s in socks:
            assert echo(s, b"x") == b"x"
        pids = wait_outbound(lab, CONNECTIONS)
        assert len(set(pids)) == 2
        owner = worker_by_client_port(lab)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        lab.wait_log(NODE_A, f"(pid {victim}) exited unexpectedly")
        # New connections are served at once by the surviving worker (the
        # dead one's listener left the reuseport group with it).
        for i in range(8):
            with connect_from(lab, "checkout", lab.ip("payments"), APP_PORT) as s:
                assert echo(s, f"after {i}".encode()) == f"after {i}".encode()
        # Connections held by the survivor are untouched.
        survivors = [s for s in socks if owner.get(s.getsockname()[1]) not in (None, victim)]
        assert survivors
        for s in survivors:
            s.settimeout(5)
            assert echo(s, b"still") == b"still"
    log = lab.wait_log(NODE_A, "worker", timeout=1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and log.count("serving on") < 3:
        time.sleep(0.1)
        log = lab.log(NODE_A)
    assert log.count("serving on") >= 3, "the killed worker was not started again"
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(connect_from(lab, "checkout", lab.ip("payments"), APP_PORT))
            for _ in range(CONNECTIONS)
        ]
        for s in socks:
            assert echo(s, b"y") == b"y"
        pids = wait_outbound(lab, CONNECTIONS)
        assert victim not in pids and len(set(pids)) == 2
