"""A whole Veil mesh in the lab: controller, nodes, ztunnels and agents as real processes.

:class:`LabMesh` reads a registry file, builds a :class:`~lab.Topology`
whose nodes and pods match it (same names and IPs), runs ``veil controller run``
in the underlay namespace, joins every node with a fresh join token, and starts
``veil ztunnel run`` and ``veil agent run`` inside each node's namespace. The
demo, the netns tests and the benchmarks share it so they all exercise the same
commands an operator runs.

Every process, namespace, pin directory and temporary file it makes is removed
by :meth:`LabMesh.close`, which the context manager calls on any exit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from controller.api.ports import CONTROLLER_JOIN_PORT, CONTROLLER_PORT
from node.dataplane import ADMIN_PORT, READINESS_PORT

from .errors import LabError
from .netns import in_netns
from .process import LabProcess, wait_listening
from .topology import LabNode, LabPod, Topology

__all__ = ["LabMesh", "MeshPod", "veil_argv"]

PIN_ROOT = Path("/sys/fs/bpf/veil")


def veil_argv(*args: str) -> list[str]:
    """``veil ARGS`` run with this interpreter, so it works without the venv on PATH."""
    return [sys.executable, "-m", "cli.veil", *args]


def veilctl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli.veilctl", *args]


@dataclass(frozen=True)
class MeshPod:
    """A registry workload placed in the lab."""

    name: str
    namespace: str
    service_account: str
    node: str
    ip: str
    labels: dict[str, str]
    lab: LabPod

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip6(self) -> str:
        """The pod's IPv6 address in the lab (whether or not the registry lists it)."""
        return self.lab.ip6


def _check_ipv6(workload: dict[str, Any], pod: LabPod) -> None:
    """The lab derives each pod's IPv6 address from its IPv4 one (same host
    part); a registry that lists another one would enroll an address the pod
    does not have, and the pod's real IPv6 would be dropped as unknown."""
    for text in workload.get("ips") or []:
        try:
            addr = ipaddress.ip_address(str(text))
        except ValueError:
            continue  # the controller names the bad field when it loads the file
        if addr.version == 6 and addr != ipaddress.ip_address(pod.ip6):
            raise LabError(
                f"workload {workload.get('name')}: IPv6 {text} is not the address the lab "
                f"gives this pod ({pod.ip6})",
                hint="lab pods get fd00:244:<node index>::<IPv4 host part in hex>; "
                f"write {pod.ip6} or leave the IPv6 address out",
            )


def _http_get(netns: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path from inside ``netns``; HTTP errors are answers too."""
    with in_netns(netns):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())


def _check_running(proc: LabProcess, what: str) -> None:
    """A process that exited while we wait for it is a failure, with its log's tail."""
    if proc.poll() is not None:
        raise LabError(
            f"{what} exited with {proc.returncode}",
            hint=f"see {proc.log_path}:\n{proc.log_text()[-3000:]}",
        )


class LabMesh:
    """Builds and runs a mesh from a registry file. Use as a context manager."""

    def __init__(
        self,
        registry: Path,
        *,
        workdir: Path | None = None,
        steering: str = "ebpf",
        log_level: str = "info",
        extra_ztunnel_args: Sequence[str] = (),
        ztunnel_workers: int | None = None,
    ) -> None:
        """``ztunnel_workers``: ``--workers`` for every ztunnel (None: its default,
        one per usable CPU)."""
        if steering not in ("ebpf", "tproxy", "none"):
            raise LabError(f"unknown steering {steering!r}", hint="use ebpf, tproxy or none")
        self.steering = steering
        self.log_level = log_level
        self.extra_ztunnel_args = tuple(extra_ztunnel_args)
        if ztunnel_workers is not None:
            self.extra_ztunnel_args += ("--workers", str(ztunnel_workers))
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="veil-lab-"))
        self.registry_path = self.workdir / "registry.yaml"
        shutil.copyfile(registry, self.registry_path)
        self.document: dict[str, Any] = yaml.safe_load(self.registry_path.read_text()) or {}
        self.topo = Topology()
        self.pods: dict[str, MeshPod] = {}
        self.controller: LabProcess | None = None
        self.ztunnels: dict[str, LabProcess] = {}
        self.agents: dict[str, LabProcess] = {}
        # Waypoint processes by pod name (start_waypoint).
        self.waypoints: dict[str, LabProcess] = {}
        self._closed = False
        self._pin_root_existed = PIN_ROOT.exists()
        self._declare()

    # -- layout ------------------------------------------------------------

    def _declare(self) -> None:
        nodes: dict[str, LabNode] = {}
        for w in self.document.get("workloads") or []:
            node_name = str(w["node"])
            if node_name not in nodes:
                index = len(nodes)
                nodes[node_name] = self.topo.add_node(
                    node_name, pod_cidr=f"10.244.{index + 1}.0/24"
                )
            ip = str(w["ips"][0])
            lab_pod = self.topo.add_pod(nodes[node_name], str(w["name"]), ip=ip)
            _check_ipv6(w, lab_pod)
            self.pods[str(w["name"])] = MeshPod(
                name=str(w["name"]),
                namespace=str(w["namespace"]),
                service_account=str(w.get("serviceAccount", "default")),
                node=node_name,
                ip=ip,
                labels={str(k): str(v) for k, v in (w.get("labels") or {}).items()},
                lab=lab_pod,
            )

    def pod(self, name: str) -> MeshPod:
        try:
            return self.pods[name]
        except KeyError:
            raise LabError(f"no workload {name!r} in {self.registry_path}") from None

    def node_dir(self, node: str) -> Path:
        return self.workdir / "nodes" / node

    def pin_dir(self, node: str) -> Path:
        return PIN_ROOT / f"{self.topo.prefix}-{node}"

    def agent_socket(self, node: str) -> Path:
        return Path("/run/veil") / self.topo.prefix / node / "agent.sock"

    def _log(self, name: str) -> Path:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        return self.workdir / "logs" / f"{name}.log"

    # -- processes ---------------------------------------------------------

    def start(self) -> LabMesh:
        """Build the topology and start every component; returns once all are ready."""
        self.topo.build()
        self.start_controller()
        for node in self.topo.nodes:
            self.join(node)
        for node in self.topo.nodes:
            if self.steering != "none":
                self.start_ztunnel(node)
            if self.steering == "ebpf":
                self.start_agent(node)
            elif self.steering == "tproxy":
                self._enable_tproxy(node)
        for node in self.topo.nodes:
            if node in self.ztunnels:
                self.wait_ztunnel_ready(node)
            if node in self.agents:
                self.wait_agent_ready(node)
        return self

    def _run(self, where: str | LabNode | LabPod, room: str, *flags: str) -> LabProcess:
        """Starts ``veil <room> run FLAGS`` in ``where``: the one argv builder for
        every long-running Veil process of the lab.

        It logs to logs/<room>-<node or pod>.log, or logs/<room>.log when
        ``where`` is a namespace name (the underlay's single controller).
        """
        name = room if isinstance(where, str) else f"{room}-{where.name}"
        argv = veil_argv("--log-level", self.log_level, room, "run", *flags)
        return self.topo.popen(where, argv, log_path=self._log(name))

    def _node_flags(self, node: str) -> tuple[str, ...]:
        """The flags the ztunnel and the agent of ``node`` share."""
        return (
            "--node", node,
            "--state-dir", str(self.node_dir(node)),
            "--pin-dir", str(self.pin_dir(node)),
        )  # fmt: skip

    def start_controller(self) -> LabProcess:
        ip = self.topo.controller_ip
        self.controller = self._run(
            self.topo.underlay_netns,
            "controller",
            "--registry", str(self.registry_path),
            "--state-dir", str(self.workdir / "controller"),
            "--listen", f"{ip}:{CONTROLLER_PORT}",
            "--join-listen", f"{ip}:{CONTROLLER_JOIN_PORT}",
        )  # fmt: skip
        self._wait_port(self.controller, CONTROLLER_PORT, "controller", 20.0)
        self._wait_port(self.controller, CONTROLLER_JOIN_PORT, "controller", 5.0)
        return self.controller

    def token(self, node: str) -> str:
        out = self.topo.run(
            self.topo.underlay_netns,
            veil_argv(
                "controller", "token", "create",
                "--node", node,
                "--state-dir", str(self.workdir / "controller"),
            ),
        )  # fmt: skip
        token = out.stdout.decode().strip().splitlines()[-1].strip()
        if not token:
            raise LabError(f"`veil controller token create --node {node}` printed no token")
        return token

    def _join(self, where: LabNode | LabPod, node: str, state_dir: Path) -> None:
        """``veil node join`` with a fresh token for ``node``, run in ``where``."""
        token = self.token(node)
        self.topo.run(
            where,
            veil_argv(
                "node", "join",
                "--controller", f"{self.topo.controller_ip}:{CONTROLLER_JOIN_PORT}",
                "--token", token,
                "--node", node,
                "--state-dir", str(state_dir),
            ),
        )  # fmt: skip

    def join(self, node: str) -> None:
        self._join(self.topo.node(node), node, self.node_dir(node))

    def start_ztunnel(self, node: str) -> LabProcess:
        lab_node = self.topo.node(node)
        proc = self._run(lab_node, "ztunnel", *self._node_flags(node), *self.extra_ztunnel_args)
        self.ztunnels[node] = proc
        return proc

    def stop_ztunnel(self, node: str) -> None:
        proc = self.ztunnels.pop(node, None)
        if proc is not None:
            proc.close(grace=5.0)

    def start_agent(self, node: str) -> LabProcess:
        lab_node = self.topo.node(node)
        proc = self._run(
            lab_node,
            "agent",
            *self._node_flags(node),
            "--status-socket", str(self.agent_socket(node)),
            "--uplink", lab_node.uplink,
        )  # fmt: skip
        self.agents[node] = proc
        return proc

    def _enable_tproxy(self, node: str) -> None:
        from .tproxy import enable_tproxy

        lab_node = self.topo.node(node)
        enrolled = [p.lab for p in self.pods.values() if p.node == node and self.enrolled(p)]
        enable_tproxy(lab_node, enrolled)

    def enrolled(self, pod: MeshPod) -> bool:
        """Enrollment as the registry declares it (namespace label, pod opt-out)."""
        ns_labels: dict[str, str] = {}
        for ns in self.document.get("namespaces") or []:
            if ns.get("name") == pod.namespace:
                ns_labels = ns.get("labels") or {}
        return (
            ns_labels.get("veil.io/dataplane-mode") == "ambient"
            and pod.labels.get("veil.io/dataplane-mode") != "none"
        )

    def waypoint_pods(self) -> list[MeshPod]:
        """The registry's waypoint replicas (label veil.io/waypoint)."""
        return [p for p in self.pods.values() if p.labels.get("veil.io/waypoint")]

    def start_waypoint(self, pod_name: str, timeout: float = 30.0) -> LabProcess:
        """Joins and runs ``veil waypoint run`` in the waypoint pod's own namespace.

        The waypoint is a node process of its own: it joins with a fresh
        token for the node its Workload names (node-scoped issuance) into its
        own state directory, and serves HBONE on the pod's address. Returns
        once its admin API reports ready.
        """
        pod = self.pod(pod_name)
        state = self.workdir / "waypoints" / pod_name
        self._join(pod.lab, pod.node, state)
        proc = self._run(
            pod.lab,
            "waypoint",
            "--node", pod.node,
            "--namespace", pod.namespace,
            "--name", pod.labels["veil.io/waypoint"],
            "--service-account", pod.service_account,
            "--state-dir", str(state),
            "--listen-address", "::",  # dual stack, like the pod
        )  # fmt: skip
        self.waypoints[pod_name] = proc
        self._wait_ready(proc, f"waypoint {pod_name}", pod.lab.netns, ADMIN_PORT, timeout)
        return proc

    def pod_http_get(
        self, pod_name: str, port: int, path: str, timeout: float = 2.0
    ) -> tuple[int, bytes]:
        """GET http://127.0.0.1:port/path from inside a pod's namespace."""
        return _http_get(self.pod(pod_name).lab.netns, port, path, timeout)

    # -- readiness ---------------------------------------------------------

    def _wait_port(self, proc: LabProcess, port: int, what: str, timeout: float) -> None:
        try:
            wait_listening(proc, port, timeout)
        except LabError as e:
            raise LabError(
                f"{what} did not listen on :{port} within {timeout:.0f}s: {e.message}",
                hint=f"see its log: {proc.log_path}\n{proc.log_text()[-2000:]}",
            ) from None

    def http_get(self, node: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        """GET http://127.0.0.1:port/path from inside a node's namespace."""
        return _http_get(self.topo.node(node).netns, port, path, timeout)

    def wait_ztunnel_ready(self, node: str, timeout: float = 30.0) -> None:
        netns = self.topo.node(node).netns
        self._wait_ready(self.ztunnels[node], f"ztunnel on {node}", netns, READINESS_PORT, timeout)

    @staticmethod
    def _wait_ready(proc: LabProcess, what: str, netns: str, port: int, timeout: float) -> None:
        """Polls /healthz/ready on ``port`` inside ``netns`` until it answers 200."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            _check_running(proc, what)
            try:
                status, body = _http_get(netns, port, "/healthz/ready")
                if status == 200:
                    return
                last = f"HTTP {status} {body[:200]!r}"
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise LabError(
            f"{what} not ready after {timeout:.0f}s ({last})",
            hint=f"see {proc.log_path}:\n{proc.log_text()[-3000:]}",
        )

    def wait_agent_ready(self, node: str, timeout: float = 60.0) -> None:
        """Waits until the agent reports every enrolled local pod redirected."""
        proc = self.agents[node]
        want = {p.ip for p in self.pods.values() if p.node == node and self.enrolled(p)}
        deadline = time.monotonic() + timeout
        last: Any = "no answer"
        while time.monotonic() < deadline:
            _check_running(proc, f"agent on {node}")
            with contextlib.suppress(LabError, ValueError):
                pods = self.veilctl_json(node, "pods")
                have = {p.get("ip") for p in pods if p.get("enrolled") and p.get("attached", True)}
                if want <= have:
                    return
                last = pods
            time.sleep(0.2)
        raise LabError(
            f"agent on {node} did not enroll {sorted(want)} within {timeout:.0f}s (last: {last})",
            hint=f"see {proc.log_path}:\n{proc.log_text()[-3000:]}",
        )

    # -- inspection --------------------------------------------------------

    def veilctl(self, node: str, *args: str, check: bool = False) -> tuple[int, str]:
        """Runs veilctl in a node's namespace; returns (exit code, stdout+stderr)."""
        import subprocess

        from .process import netns_argv

        argv = netns_argv(
            self.topo.node(node).netns,
            veilctl_argv("--agent-socket", str(self.agent_socket(node)), *args),
        )
        done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        text = done.stdout.decode() + done.stderr.decode()
        if check and done.returncode != 0:
            raise LabError(f"veilctl {' '.join(args)} on {node} exited {done.returncode}: {text}")
        return done.returncode, text

    def veilctl_json(self, node: str, *args: str) -> Any:
        code, text = self.veilctl(node, *args, "-o", "json")
        if code != 0:
            raise LabError(f"veilctl {' '.join(args)} on {node} exited {code}: {text[-500:]}")
        return json.loads(text)

    def config_dump(self, node: str) -> Any:
        status, body = self.http_get(node, ADMIN_PORT, "/config_dump")
        if status != 200:
            raise LabError(f"ztunnel on {node}: /config_dump answered HTTP {status}")
        return json.loads(body)

    def update_registry(self, mutate: Any) -> None:
        """Applies ``mutate(document)`` and rewrites the registry atomically."""
        mutate(self.document)
        tmp = self.registry_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.document, sort_keys=False))
        os.replace(tmp, self.registry_path)

    @contextlib.contextmanager
    def in_pod(self, name: str) -> Iterator[MeshPod]:
        pod = self.pod(name)
        with in_netns(pod.lab.netns):
            yield pod

    # -- teardown ----------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        try:
            self.topo.close()
        except LabError as e:
            errors.append(str(e))
        for node in self.topo.nodes:
            self._uninstall_pins(node, errors)
            with contextlib.suppress(OSError):
                shutil.rmtree(self.agent_socket(node).parent.parent)
        # The lab's pin directories live under the production default; remove
        # that parent only when the lab made it and nothing else uses it.
        if not self._pin_root_existed:
            with contextlib.suppress(OSError):
                PIN_ROOT.rmdir()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError("lab mesh teardown left problems: " + "; ".join(errors))

    def _uninstall_pins(self, node: str, errors: list[str]) -> None:
        pin_dir = self.pin_dir(node)
        if not pin_dir.exists():
            return
        # The node namespace (and its filters and rules) is gone with the
        # topology; only the bpffs pins are global and must go explicitly.
        try:
            shutil.rmtree(pin_dir)
        except OSError as e:
            errors.append(f"pins {pin_dir}: {e}")

    def __enter__(self) -> LabMesh:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
