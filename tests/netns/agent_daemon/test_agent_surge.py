"""Two agents on one node, as during a DaemonSet rolling update with maxSurge 1.

The new agent starts while the old one runs, takes the shared status socket
over atomically, and becomes the one veilctl and the probes talk to; the old
one stops reconciling, exits on SIGTERM without removing the new socket, and
redirection of the enrolled pod never stops (a probe loop runs throughout and
no connection may go direct).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from agent.status import StatusClient

from .conftest import REPO, AgentNode, json_out, probe, registry_doc, veil

SERVER = "10.244.2.10"


def _health_this_pod(env: AgentNode, pod: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        env.in_node(veil("agent", "health", "--ready", "--this-pod",
                         "--status-socket", str(env.socket))),
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "VEIL_POD_NAME": pod},
    )  # fmt: skip


def _start_second_agent(env: AgentNode, pod: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = env.work / "agent-surge.log"
    argv = veil(
        "agent", "run", "--node", "node-a", "--state-dir", str(env.state_dir),
        "--pin-dir", str(env.pin_dir), "--status-socket", str(env.socket),
        "--resync-interval", "1h", "--veth-retry", "100ms",
    )  # fmt: skip
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            env.in_node(argv), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "VEIL_POD_NAME": pod},
        )  # fmt: skip
    return proc, log_path


def _socket_pid(env: AgentNode) -> int | None:
    try:
        return int(StatusClient(str(env.socket), timeout=2.0).get("/status")["pid"])
    except Exception:
        return None


def test_surge_agent_takes_over_and_redirection_never_stops(agent_node: AgentNode) -> None:
    env = agent_node
    client = env.pod("client")
    old = env.agent
    assert old is not None and old.poll() is None
    old_pid = env.status()["pid"]
    old_log = env.agent_log
    assert old_log is not None
    assert probe(client, SERVER) == "captured"

    # Before the takeover the shared path leads to the old agent: the new
    # pod's probe must not count that as its own agent being ready.
    early = _health_this_pod(env, "veil-node-new")
    assert early.returncode == 1, early.stdout + early.stderr
    assert "has not taken the status socket over" in early.stderr

    results: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        for _ in range(3000):  # bounded: about a minute at most
            if stop.is_set():
                return
            results.append(probe(client, SERVER, timeout=1.0))
            time.sleep(0.01)

    prober = threading.Thread(target=loop, daemon=True)
    prober.start()
    new: subprocess.Popen[bytes] | None = None
    new_log = env.work / "agent-surge.log"
    try:
        new, new_log = _start_second_agent(env, "veil-node-new")
        deadline = time.monotonic() + 90
        while _socket_pid(env) in (None, old_pid):
            assert new.poll() is None, new_log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, new_log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        env.agent = new  # the fixture's cleanup stops the agent that owns the node now
        text = new_log.read_text(errors="replace")
        assert f"took over the status socket {env.socket} from the agent running as pid" in text
        assert old.poll() is None  # the old agent is still running
        env.wait_ready()
        st = env.status()
        assert st["pod"] == "veil-node-new" and st["superseded"] is False
        assert st["load"]["reused_pins"] is True  # same build: nothing swapped

        # veilctl and the probe now reach the new agent.
        pods = env.veilctl("pods", "-o", "json")
        assert pods.returncode == 0, pods.stderr
        assert any(row.get("workload") == "shop/client" for row in json_out(pods))
        ready = _health_this_pod(env, "veil-node-new")
        assert ready.returncode == 0, ready.stderr

        # A registry change wakes both; only the new agent may act on it.
        doc = registry_doc()
        doc["workloads"][1]["labels"] = {"veil.io/dataplane-mode": "none"}
        env.write_registry(doc)
        env.wait_for("shop/other tracked",
                     lambda: env.pods()["shop/other"]["dataplane"] == "tracked")  # fmt: skip
        deadline = time.monotonic() + 15
        while "this agent stops reconciling" not in old_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, old_log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        env.write_registry(registry_doc())
        env.wait_for("shop/other enrolled again",
                     lambda: env.pods()["shop/other"]["dataplane"] == "enrolled")  # fmt: skip

        # The old pod goes away: SIGTERM, exit 0, the new socket stays.
        os.killpg(old.pid, signal.SIGTERM)
        assert old.wait(30) == 0
        assert env.socket.exists()
        assert _socket_pid(env) == st["pid"]
        assert probe(client, SERVER) == "captured"
        time.sleep(0.3)
    finally:
        stop.set()
        prober.join(15)
        if old.poll() is None:
            os.killpg(old.pid, signal.SIGKILL)
            old.wait(10)
        if new is not None and env.agent is not new and new.poll() is None:
            os.killpg(new.pid, signal.SIGKILL)
            new.wait(10)
    assert results, "the probe loop never ran"
    assert "direct" not in results, f"{results.count('direct')} connection(s) bypassed the mesh"
    assert set(results) == {"captured"}, {r: results.count(r) for r in set(results)}
