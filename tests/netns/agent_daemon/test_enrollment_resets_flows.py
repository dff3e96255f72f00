"""Enrollment resets the flows a pod opened before it (issue: they were blackholed).

A connection a pod opened while it was not enrolled is steered into the
ztunnel from its next packet on; the ztunnel has no socket for it, so without
a reset the application waits for its own TCP timeout. The agent aborts the
pod's TCP sockets when it enrolls it (sock_diag SOCK_DESTROY from the pod's
namespace, like ``ss -K``): the application sees the error at once.
Loopback connections inside the pod are not the mesh's business and survive.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from lab import in_netns

from .conftest import AgentNode, probe, registry_doc

SERVER = "10.244.2.10"
HOLD_PORT = 9099
RESET_BUDGET = 3.0


@contextlib.contextmanager
def holding_echo(env: AgentNode) -> Iterator[None]:
    """An echo server in the server pod that keeps every connection open."""
    with in_netns(env.pod("server").netns):
        listener = socket.create_server(("0.0.0.0", HOLD_PORT))
    listener.settimeout(0.2)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        listener.close()
        thread.join(5)
        for c in conns:
            c.close()


def _loopback_pair(env: AgentNode) -> tuple[socket.socket, socket.socket, socket.socket]:
    with in_netns(env.pod("other").netns):
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname()[:2], timeout=5)
    accepted, _ = server.accept()
    return server, client, accepted


def test_enrollment_resets_connections_opened_before_it(agent_node: AgentNode) -> None:
    env = agent_node
    other = env.pod("other")
    opted_out = copy.deepcopy(registry_doc())
    opted_out["workloads"][1]["labels"] = {"veil.io/dataplane-mode": "none"}
    env.write_registry(opted_out)
    env.wait_for("shop/other tracked", lambda: env.pods()["shop/other"]["dataplane"] == "tracked")
    with holding_echo(env):
        with in_netns(other.netns):
            flow = socket.create_connection((SERVER, HOLD_PORT), timeout=5)
        lo_server, lo_client, lo_accepted = _loopback_pair(env)
        try:
            flow.sendall(b"before")
            assert flow.recv(16) == b"before"
            env.write_registry(registry_doc())
            env.wait_for(
                "shop/other enrolled",
                lambda: env.pods()["shop/other"]["dataplane"] == "enrolled",
            )
            enrolled_at = time.monotonic()
            flow.settimeout(10)
            with pytest.raises(OSError) as err:
                flow.sendall(b"after")  # may still be buffered: the read tells
                flow.recv(16)
            waited = time.monotonic() - enrolled_at
            assert err.value.errno in (errno.ECONNABORTED, errno.ECONNRESET), err.value
            assert waited < RESET_BUDGET, f"the reset came {waited:.1f}s after enrollment"
            # The pod's loopback traffic is untouched.
            lo_client.sendall(b"ping")
            assert lo_accepted.recv(4) == b"ping"
            assert "reset 1 connection(s) opened before enrollment" in env.log()
            # A new connection goes through the capture.
            assert probe(other, SERVER) == "captured"
        finally:
            for s in (flow, lo_server, lo_client, lo_accepted):
                s.close()
            env.write_registry(registry_doc())


def test_health_command_is_the_probe_for_a_running_agent(agent_node: AgentNode) -> None:
    env = agent_node
    sock = ("--status-socket", str(env.socket))
    live = env.veil("agent", "health", *sock)
    assert (live.returncode, live.stdout.strip()) == (0, "alive"), live.stderr
    ready = env.veil("agent", "health", "--ready", "--quiet", *sock)
    assert (ready.returncode, ready.stdout) == (0, ""), ready.stderr
    gone = env.veil("agent", "health", "--status-socket", str(env.socket) + ".missing")
    assert gone.returncode == 1 and "not healthy" in gone.stderr
