"""Fixtures of the real-API-server tier: one control plane per module, the shipped
daemonset/ applied, controllers as real ``veil controller run`` processes with the
veil-controller ServiceAccount's token, nodes joining with pod-bound veil-node tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.api.client import ControllerClient, join_node
from controller.api.model import ResourceType, Workload
from controller.api.spiffe import node_identity
from node.csr import build_csr, generate_key, key_pem

from .control_plane import ROOT, ApiError, ControlPlane, daemonset_manifests, free_port

TD = "cluster.local"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
NODES = ("node-a", "node-b")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.k8s_real)


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    cp = ControlPlane()
    try:
        for doc in daemonset_manifests():
            cp.apply(doc)
        deadline = time.monotonic() + 30
        while not cp.served("security.veil.io/v1") and time.monotonic() < deadline:
            time.sleep(0.2)
        for node in NODES:
            node_pod(cp, f"veil-node-{node[-1]}", node)
        yield cp
    finally:
        cp.close()


def namespace(cp: ControlPlane, name: str, mode: str | None = None) -> dict[str, Any]:
    labels = {"veil.io/dataplane-mode": mode} if mode else {}
    return cp.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    )


def label_namespace(cp: ControlPlane, name: str, mode: str | None) -> None:
    cp.merge_patch(
        f"/api/v1/namespaces/{name}", {"metadata": {"labels": {"veil.io/dataplane-mode": mode}}}
    )


def service_account(cp: ControlPlane, ns: str, name: str) -> None:
    with contextlib.suppress(ApiError):
        cp.request(
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        )


def pod(
    cp: ControlPlane,
    name: str,
    ns: str,
    ip: str,
    *,
    node: str = "node-a",
    sa: str = "default",
    labels: dict[str, str] | None = None,
    host_network: bool = False,
) -> dict[str, Any]:
    """A pod already bound to ``node`` and Running with ``ip`` (there is no kubelet)."""
    service_account(cp, ns, sa)
    created = cp.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {
                "nodeName": node,
                "serviceAccountName": sa,
                "automountServiceAccountToken": False,
                "hostNetwork": host_network,
                "containers": [{"name": "app", "image": "app:1"}],
            },
        }
    )
    status = {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    }
    cp.merge_patch(f"/api/v1/namespaces/{ns}/pods/{name}/status", status)
    return created


def node_pod(cp: ControlPlane, name: str, node: str) -> dict[str, Any]:
    ip = f"192.168.0.{NODES.index(node) + 1}"
    return pod(cp, name, "veil-system", ip, node=node, sa="veil-node", host_network=True)


def node_token(cp: ControlPlane, node: str) -> str:
    """A veil-node token bound to the node's Veil pod, audience veil (as node.yaml projects)."""
    obj = cp.request("GET", f"/api/v1/namespaces/veil-system/pods/veil-node-{node[-1]}")
    return cp.token("veil-system", "veil-node", ["veil"], pod=obj)


def root_pem(cp: ControlPlane) -> bytes:
    cm = cp.request("GET", "/api/v1/namespaces/veil-system/configmaps/veil-ca-root")
    return str(cm["data"]["root-cert.pem"]).encode()


class ControllerProcess:
    """``veil controller run --source kubernetes`` as its own process, tracked by PID."""

    def __init__(
        self,
        cp: ControlPlane,
        workdir: Path,
        name: str,
        *,
        service_account: str = "veil-controller",
        api_url: str | None = None,
    ) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        token = cp.token("veil-system", service_account, [API_AUDIENCE])
        (self.dir / "token").write_text(token)
        self.listen, self.join_port, self.health_port = free_port(), free_port(), free_port()
        self.log = self.dir / "controller.log"
        env = dict(os.environ, POD_NAME=name, POD_NAMESPACE="veil-system")
        argv = [
            sys.executable,
            "-m",
            "cli.veil",
            "controller",
            "run",
            "--source",
            "kubernetes",
            "--kube-api",
            api_url or cp.url,
            "--kube-token-file",
            str(self.dir / "token"),
            "--kube-ca-file",
            str(cp.ca_file),
            "--state-dir",
            str(self.dir / "state"),
            "--listen",
            f"127.0.0.1:{self.listen}",
            "--join-listen",
            f"127.0.0.1:{self.join_port}",
            "--health-addr",
            f"127.0.0.1:{self.health_port}",
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def mtls(self) -> str:
        return f"127.0.0.1:{self.listen}"

    @property
    def join(self) -> str:
        return f"127.0.0.1:{self.join_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.health_port}/healthz/ready"
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    async def wait_health(
        self, check: Callable[[int, dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: tuple[int, dict[str, Any]] | None = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.output()[-3000:]}"
            with contextlib.suppress(OSError, ValueError):
                last = self.health()
                if check(*last):
                    return last[1]
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"{self.name} health never matched; last {last}\n{self.output()[-3000:]}"
        )

    async def wait_ready(self, timeout: float = 45.0) -> dict[str, Any]:
        return await self.wait_health(lambda status, doc: status == 200, timeout)

    def wait_ready_blocking(self, timeout: float = 45.0) -> None:
        """:meth:`wait_ready` for synchronous fixtures."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()[-3000:]
            with contextlib.suppress(OSError, ValueError):
                if self.health()[0] == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"controller never ready:\n{self.output()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit (the test then fails on the code)."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)
            return -9


@pytest.fixture
def controllers(plane: ControlPlane, tmp_path: Path) -> Iterator[Callable[..., ControllerProcess]]:
    started: list[ControllerProcess] = []

    def start(name: str = "ctl-1", **kwargs: Any) -> ControllerProcess:
        proc = ControllerProcess(plane, tmp_path, name, **kwargs)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@contextlib.asynccontextmanager
async def joined(
    cp: ControlPlane, ctl: ControllerProcess, node: str
) -> AsyncIterator[ControllerClient]:
    """A node joined with its pod-bound token, as an mTLS client of ``ctl``."""
    key = generate_key()
    result = await join_node(
        ctl.join, root_pem(cp), node_token(cp, node), node, build_csr(key, node_identity(TD, node))
    )
    client = ControllerClient(
        ctl.mtls,
        key_pem=key_pem(key),
        cert_chain_pem=b"".join(result.cert_chain),
        trust_bundle_pem=b"".join(result.trust_bundle),
    )
    async with client:
        yield client


class NodeView:
    """A node's Discovery watch folded into the current set of workloads."""

    def __init__(self, client: ControllerClient, node: str) -> None:
        self.workloads: dict[str, Workload] = {}
        self.upserts: list[str] = []  # every workload key ever upserted, in order
        self._stream = client.watch(node=node, types=[ResourceType.WORKLOAD])
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for update in self._stream:
            if update.snapshot:
                self.workloads.clear()
            for r in update.upserts:
                if isinstance(r, Workload):
                    self.workloads[r.key] = r
                    self.upserts.append(r.key)
            for rtype, key in update.removals:
                if rtype is ResourceType.WORKLOAD:
                    self.workloads.pop(key, None)

    async def __aenter__(self) -> NodeView:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self._stream.aclose()

    async def until(
        self, check: Callable[[dict[str, Workload]], bool], timeout: float = 15.0, what: str = ""
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._task is not None and self._task.done():
                self._task.result()
                raise AssertionError("the Discovery watch ended")
            if check(self.workloads):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; node sees {sorted(self.workloads)}")


@contextlib.contextmanager
def running_controller(
    plane: ControlPlane, workdir: Path, name: str
) -> Iterator[ControllerProcess]:
    """A controller process, ready; stopped (and required to exit 0) afterwards."""
    proc = ControllerProcess(plane, workdir, name)
    try:
        proc.wait_ready_blocking()
        yield proc
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]
