"""A node with a real agent: lab topology, ``veil controller run``, join, ``veil agent run``.

Layout (one lab per test module, built once because compiling the programs
and starting the controller cost seconds)::

    underlay   veil controller run on the lab's controller IP (10.100.0.1),
               through tests.support.controller.ControllerProcess
    node-a     veil agent run (nsenter --net, so the host's bpffs stays visible)
               + the capture stand-in on 15001/15006/15008
      shop/client 10.244.1.10   shop/other 10.244.1.11   legacy/plain 10.244.1.12
    node-b     (no agent)
      legacy/server 10.244.2.10 runs the lab whoami app on :8080

The capture stand-in is a test listener, not a Veil component: it listens like
the ztunnel does (0.0.0.0, IP_TRANSPARENT, SO_MARK = MARK_ZTUNNEL) and echoes.
So a probe from a pod tells the two paths apart: whoami's JSON answer means the
connection went direct, the request echoed back means it was captured.

Everything is removed at the end, also on failure: the agent is killed, its
filters, rules and pins removed, processes stopped, namespaces deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.bpf import uninstall_node
from agent.status import StatusClient, StatusUnavailable
from controller.api.ports import CONTROLLER_JOIN_PORT, CONTROLLER_PORT
from lab import LabNode, LabPod, Topology, in_netns
from lab.netns import list_netns, netns_path
from node.dataplane import HBONE_PORT, INBOUND_PLAINTEXT_PORT, MARK_ZTUNNEL, OUTBOUND_PORT
from tests.support.controller import ControllerProcess

REPO = Path(__file__).resolve().parents[3]
PIN_ROOT = Path("/sys/fs/bpf/veil-agentd")
APP_PORT = 8080
_IP_TRANSPARENT = 19


def veil(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.veil", *args]


def registry_doc() -> dict[str, Any]:
    return {
        "trustDomain": "cluster.local",
        "namespaces": [
            {"name": "shop", "labels": {"veil.io/dataplane-mode": "ambient"}},
            {"name": "legacy"},
        ],
        "workloads": [
            {
                "name": "client",
                "namespace": "shop",
                "serviceAccount": "client",
                "node": "node-a",
                "ips": ["10.244.1.10"],
            },
            {
                "name": "other",
                "namespace": "shop",
                "serviceAccount": "other",
                "node": "node-a",
                "ips": ["10.244.1.11"],
            },
            {
                "name": "plain",
                "namespace": "legacy",
                "serviceAccount": "default",
                "node": "node-a",
                "ips": ["10.244.1.12"],
            },
            {
                "name": "server",
                "namespace": "legacy",
                "serviceAccount": "default",
                "node": "node-b",
                "ips": ["10.244.2.10"],
            },
        ],
        "authorizationPolicies": [
            {
                "name": "client-only",
                "namespace": "shop",
                "spec": {
                    "action": "ALLOW",
                    "rules": [
                        {
                            "from": [
                                {"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}
                            ],
                            "to": [{"operation": {"ports": ["8080"]}}],
                        }
                    ],
                },
            },
        ],
    }


@dataclass
class CaptureStandIn:
    """Transparent, ztunnel-marked echo listeners in the node namespace."""

    netns: str
    ports: tuple[int, ...] = (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT)
    accepted: list[tuple[int, tuple[str, int]]] = field(default_factory=list)
    _socks: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> CaptureStandIn:
        with in_netns(self.netns):
            for port in self.ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK_ZTUNNEL)
                sock.bind(("0.0.0.0", port))
                sock.listen(128)
                sock.settimeout(0.2)
                self._socks.append(sock)
        for sock in list(self._socks):
            t = threading.Thread(target=self._accept, args=(sock,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _accept(self, listener: socket.socket) -> None:
        port = listener.getsockname()[1]
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append((port, conn.getsockname()[:2]))
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5.0)
            while data := conn.recv(65536):
                conn.sendall(data)

    def stop(self) -> None:
        self._stop.set()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()
        for t in self._threads:
            t.join(1.0)


def probe(pod: LabPod, ip: str, port: int = APP_PORT, timeout: float = 1.0) -> str:
    """ "direct" (the server answered), "captured" (the stand-in echoed) or "failed"."""
    request = b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n"
    try:
        with in_netns(pod.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            sock.sendall(request)
            got = b""
            while len(got) < len(request):
                data = sock.recv(4096)
                if not data:
                    break
                got += data
    except OSError:
        return "failed"
    if got.startswith(b"HTTP/1.1 200"):
        return "direct"
    if got == request:
        return "captured"
    return "failed"


@dataclass
class AgentNode:
    """The running lab: controller, node-a with its agent, and helpers to poke at them."""

    topo: Topology
    work: Path
    registry: Path
    controller_state: Path
    node: LabNode
    state_dir: Path
    pin_dir: Path
    socket: Path
    standin: CaptureStandIn
    agent: subprocess.Popen[bytes] | None = None
    agent_log: Path | None = None
    _starts: int = 0

    @property
    def netns_path(self) -> str:
        return str(netns_path(self.node.netns))

    def pod(self, name: str) -> LabPod:
        return self.topo.pod(name)

    def write_registry(self, doc: dict[str, Any]) -> None:
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.registry)

    def in_node(self, argv: list[str]) -> list[str]:
        # nsenter --net, not `ip netns exec`: the latter remounts /sys and hides bpffs.
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def start_agent(self, *extra: str) -> subprocess.Popen[bytes]:
        self._starts += 1
        self.agent_log = self.work / f"agent-{self._starts}.log"
        argv = veil(
            "agent",
            "run",
            "--node",
            "node-a",
            "--state-dir",
            str(self.state_dir),
            "--pin-dir",
            str(self.pin_dir),
            "--status-socket",
            str(self.socket),
            "--resync-interval",
            "1h",
            "--veth-retry",
            "100ms",
            *extra,
        )
        with self.agent_log.open("wb") as log:
            self.agent = subprocess.Popen(
                self.in_node(argv),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.agent

    def log(self) -> str:
        return self.agent_log.read_text(errors="replace") if self.agent_log else ""

    def status(self, path: str = "/status") -> Any:
        return StatusClient(str(self.socket), timeout=5.0).get(path)

    def wait_for(
        self, what: str, cond: Callable[[], bool], timeout: float = 15.0, step: float = 0.05
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.agent is not None and self.agent.poll() is not None:
                raise AssertionError(f"agent exited {self.agent.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(StatusUnavailable):
                if cond():
                    return
            time.sleep(step)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-3000:]}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the agent has reconciled once against the registry with nothing pending."""

        def ready() -> bool:
            st = self.status()
            return bool(st["registry"]["synced"] and st["last_reconcile"] and not st["pending"])

        self.wait_for("the agent's first reconcile", ready, timeout, 0.1)

    def pods(self) -> dict[str, dict[str, Any]]:
        return {row["workload"] or row["ip"]: row for row in self.status("/pods")}

    def kill_agent(self, sig: signal.Signals = signal.SIGKILL) -> int:
        assert self.agent is not None
        os.killpg(self.agent.pid, sig)
        code = self.agent.wait(15)
        self.agent = None
        return code

    def veilctl(self, *args: str, admin: str = "127.0.0.1:1") -> subprocess.CompletedProcess[str]:
        argv = [
            sys.executable,
            "-m",
            "agent.cli.veilctl",
            "--agent-socket",
            str(self.socket),
            "--ztunnel-admin",
            admin,
            *args,
        ]
        return subprocess.run(
            self.in_node(argv), cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )

    def veil(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.in_node(veil(*args)),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _start_controller(topo: Topology, work: Path, registry: Path, state: Path) -> ControllerProcess:
    """``veil controller run`` in the underlay, on the lab's controller IP and standard ports."""
    return ControllerProcess(
        work, host=topo.controller_ip, netns=topo.underlay_netns,
        mtls_port=CONTROLLER_PORT, join_port=CONTROLLER_JOIN_PORT,
        registry_path=registry, state_path=state, registry_poll=0.05,
    ).start()  # fmt: skip


def _join(topo: Topology, node: LabNode, state_ctl: Path, state_dir: Path) -> None:
    out = topo.run(
        topo.underlay_netns,
        veil("controller", "token", "create", "--node", node.name, "--state-dir", str(state_ctl)),
    )
    token = out.stdout.decode().strip().splitlines()[-1].strip()
    topo.run(
        node,
        veil(
            "node",
            "join",
            "--controller",
            f"{topo.controller_ip}:{CONTROLLER_JOIN_PORT}",
            "--token",
            token,
            "--node",
            node.name,
            "--state-dir",
            str(state_dir),
        ),
    )


def remove_stale_pins() -> None:
    """Pin directories of labs whose namespaces are gone (a crashed run)."""
    if not PIN_ROOT.exists():
        return
    live = {name.split("-", 1)[0] for name in list_netns()}
    for entry in PIN_ROOT.iterdir():
        if entry.is_dir() and entry.name.split("-", 1)[0] not in live:
            _remove_pins(entry)


def _remove_pins(pin_dir: Path) -> None:
    if pin_dir.exists():
        for pin in pin_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                pin.unlink()
        with contextlib.suppress(OSError):
            pin_dir.rmdir()


@pytest.fixture(scope="module")
def agent_node() -> Iterator[AgentNode]:
    remove_stale_pins()
    topo = Topology()
    work = Path(tempfile.mkdtemp(prefix="veil-agentd-"))
    env: AgentNode | None = None
    standin: CaptureStandIn | None = None
    controller: ControllerProcess | None = None
    try:
        node = topo.add_node("node-a", pod_cidr="10.244.1.0/24")
        remote = topo.add_node("node-b", pod_cidr="10.244.2.0/24")
        topo.add_pod(node, "client", "10.244.1.10")
        topo.add_pod(node, "other", "10.244.1.11")
        topo.add_pod(node, "plain", "10.244.1.12")
        server = topo.add_pod(remote, "server", "10.244.2.10")
        topo.build()
        topo.start_app(server, "whoami", APP_PORT)
        registry = work / "registry.yaml"
        registry.write_text(yaml.safe_dump(registry_doc(), sort_keys=False))
        ctl_state = work / "controller"
        controller = _start_controller(topo, work, registry, ctl_state)
        state_dir = work / "node-a"
        _join(topo, node, ctl_state, state_dir)
        standin = CaptureStandIn(node.netns).start()
        env = AgentNode(
            topo=topo,
            work=work,
            registry=registry,
            controller_state=ctl_state,
            node=node,
            state_dir=state_dir,
            pin_dir=PIN_ROOT / f"{topo.prefix}-node-a",
            socket=work / "run" / "agent.sock",
            standin=standin,
        )
        env.start_agent()
        env.wait_ready()
        yield env
    finally:
        if env is not None and env.agent is not None and env.agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(env.agent.pid, signal.SIGKILL)
            env.agent.wait(10)
        if standin is not None:
            standin.stop()
        if env is not None:
            with contextlib.suppress(Exception), in_netns(env.node.netns):
                uninstall_node(env.pin_dir)
            _remove_pins(env.pin_dir)
        with contextlib.suppress(OSError):
            PIN_ROOT.rmdir()
        if controller is not None:
            controller.stop()
        topo.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def json_out(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout)
