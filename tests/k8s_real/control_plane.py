"""A real Kubernetes control plane for tests: etcd and kube-apiserver on loopback.

Like envtest for Go controllers: no kubelet, scheduler or controller-manager,
so tests create ServiceAccounts themselves, create pods already bound to a node
(``spec.nodeName``) with ``automountServiceAccountToken: false``, and set pod
IPs and phase through the status subresource.

The kube-apiserver binary comes from ``VEIL_KUBE_APISERVER`` (a binary, or an
``.xz`` of one) or from ``../shared/tools/kube-apiserver/`` next to the checkout
(v1.20.2, unpacked and checked against its sha256). etcd is Debian's
``etcd-server``. Without either, tests skip saying how to get it; under ``CI``
they fail instead. Every process is started in its own session and tracked by
PID; :meth:`ControlPlane.close` kills exactly those and removes the directory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import lzma
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.ci import in_ci, require_tool

__all__ = [
    "ApiError",
    "ControlPlane",
    "TcpRelay",
    "apiserver_binary",
    "free_port",
    "stop_process",
]

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT.parent / "shared" / "tools" / "kube-apiserver"
BINARY_XZ = TOOLS / "kube-apiserver-v1.20.2.xz"
BINARY_SHA = TOOLS / "kube-apiserver-v1.20.2.sha256"
HOW_TO_GET = (
    "set VEIL_KUBE_APISERVER to a kube-apiserver v1.20+ binary (or its .xz), or put "
    "kube-apiserver-v1.20.2.xz in ../shared/tools/kube-apiserver/ (its build.sh builds it "
    "from Debian 12's kubernetes source package)"
)
ETCD_HOW = "apt-get install etcd-server (scripts/setup.sh does)"
ADMIN_TOKEN = "veil-test-admin-token"
START_TIMEOUT = 60.0  # etcd plus a cold kube-apiserver on 2 busy cores


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unavailable(message: str) -> None:
    if in_ci():
        pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def apiserver_binary(workdir: Path) -> Path:
    """The kube-apiserver to run: unpacked into ``workdir`` when it comes as .xz."""
    named = os.environ.get("VEIL_KUBE_APISERVER")
    source = Path(named) if named else BINARY_XZ
    if not source.is_file():
        _unavailable(f"no kube-apiserver at {source}: {HOW_TO_GET}")
    if source.suffix != ".xz":
        return source
    target = workdir / "kube-apiserver"
    digest = hashlib.sha256()
    with lzma.open(source) as src, target.open("wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
    target.chmod(0o755)
    if source == BINARY_XZ and BINARY_SHA.is_file():
        expected = BINARY_SHA.read_text().split()[0]
        if digest.hexdigest() != expected:
            _unavailable(f"{source} does not unpack to sha256 {expected}: {HOW_TO_GET}")
    return target


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; only this one process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class ControlPlane:
    """etcd + kube-apiserver in a temporary directory; an admin client on top."""

    def __init__(self) -> None:
        self.etcd_bin = require_tool("etcd", ETCD_HOW)
        self.dir = Path(tempfile.mkdtemp(prefix="veil-kube-"))
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        try:
            self.binary = apiserver_binary(self.dir)
            self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
            self.url = f"https://127.0.0.1:{self.port}"
            self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
            self._keys()
            self._start_etcd()
            self.start_apiserver()
        except BaseException:
            self.close()
            raise

    # -- processes -----------------------------------------------------------------

    def _keys(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.dir / "sa.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        (self.dir / "sa.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (self.dir / "tokens.csv").write_text(f"{ADMIN_TOKEN},admin,admin,system:masters\n")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _start_etcd(self) -> None:
        self.etcd = self._spawn(
            "etcd",
            [
                self.etcd_bin,
                "--data-dir",
                str(self.dir / "etcd"),
                "--listen-client-urls",
                self.etcd_url,
                "--advertise-client-urls",
                self.etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{self.peer_port}",
            ],
        )

        def healthy() -> bool:
            assert self.etcd is not None
            if self.etcd.poll() is not None:
                raise RuntimeError(f"etcd exited:\n{self.log_tail('etcd')}")
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as r:
                    return b"true" in r.read()
            except OSError:
                return False

        wait_until(healthy, START_TIMEOUT, "etcd /health")

    def start_apiserver(self) -> None:
        d = self.dir
        self.apiserver = self._spawn(
            "kube-apiserver",
            [
                str(self.binary),
                f"--etcd-servers={self.etcd_url}",
                f"--secure-port={self.port}",
                "--bind-address=127.0.0.1",
                "--insecure-port=0",
                f"--cert-dir={d / 'certs'}",
                "--advertise-address=127.0.0.1",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                # As kubeadm and managed clusters configure it: the node
                # DaemonSet's bpffs mount step is a privileged init container.
                "--allow-privileged=true",
                "--service-cluster-ip-range=10.96.0.0/16",
                # Namespaces are read from etcd directly (no watch cache), so a
                # watch from a compacted revision meets etcd's compaction (410).
                "--watch-cache-sizes=namespaces#0",
            ],
        )
        self._ssl: ssl.SSLContext | None = None

        def ready() -> bool:
            assert self.apiserver is not None
            if self.apiserver.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited:\n{self.log_tail('kube-apiserver')}")
            if not self.ca_file.exists():
                return False
            try:
                return self.request("GET", "/readyz") == "ok"
            except (OSError, ApiError, ssl.SSLError):
                return False

        wait_until(ready, START_TIMEOUT, "kube-apiserver /readyz")

    def stop_apiserver(self) -> None:
        if self.apiserver is not None:
            stop_process(self.apiserver)
            self.apiserver = None

    def close(self) -> None:
        try:
            for proc in (self.apiserver, self.etcd):
                if proc is not None:
                    stop_process(proc)
        finally:
            self.apiserver = self.etcd = None
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- etcd ----------------------------------------------------------------------

    def _etcd(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.etcd_url}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    def compact(self) -> int:
        """Compacts etcd at its current revision (physically); returns the revision."""
        key = base64.b64encode(b"/registry").decode()
        rev = int(self._etcd("/v3/kv/range", {"key": key, "limit": 1})["header"]["revision"])
        self._etcd("/v3/kv/compaction", {"revision": rev, "physical": True})
        return rev

    # -- the API -------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        return self.dir / "certs" / "apiserver.crt"

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str = ADMIN_TOKEN,
        content_type: str = "application/json",
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=20, context=self._context()) as r:
                raw = r.read().decode()
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Creates ``obj``, or replaces it (keeping its resourceVersion) if it exists."""
        path = collection_path(obj)
        try:
            created: dict[str, Any] = self.request("POST", path, obj)
            return created
        except ApiError as e:
            if e.status != 409:
                raise
        name = obj["metadata"]["name"]
        current = self.request("GET", f"{path}/{name}")
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        replaced: dict[str, Any] = self.request("PUT", f"{path}/{name}", obj)
        return replaced

    def delete(self, obj: dict[str, Any]) -> None:
        with contextlib.suppress(ApiError):
            self.request("DELETE", f"{collection_path(obj)}/{obj['metadata']['name']}")

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = self.request(
            "PATCH", path, patch, content_type="application/merge-patch+json"
        )
        return doc

    def token(self, namespace: str, sa: str, audiences: list[str], pod: Any = None) -> str:
        """TokenRequest: a token for ``sa``, bound to ``pod`` when given."""
        spec: dict[str, Any] = {"audiences": audiences, "expirationSeconds": 3600}
        if pod is not None:
            spec["boundObjectRef"] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            }
        review = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(review["status"]["token"])

    def served(self, group_version: str) -> bool:
        try:
            self.request("GET", f"/apis/{group_version}")
        except ApiError:
            return False
        return True


class TcpRelay:
    """A loopback TCP relay to the API server whose connections a test can cut.

    Cutting ends every watch a client holds through the relay while the API
    server keeps running, so the client re-watches from its last
    resourceVersion at once: the way to reach a compacted revision without a
    restart (which brings its own transient errors).
    """

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _start(self) -> asyncio.base_events.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    def cut(self) -> int:
        """Closes every relayed connection; returns how many there were."""

        def close_all() -> int:
            writers = list(self._writers)
            for w in writers:
                w.transport.abort()
            return len(writers)

        return self._call(close_all)

    def _call(self, fn: Callable[[], int]) -> int:
        return asyncio.run_coroutine_threadsafe(self._wrap(fn), self._loop).result(5)

    @staticmethod
    async def _wrap(fn: Callable[[], int]) -> int:
        return fn()

    def close(self) -> None:
        def shutdown() -> int:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            return 0

        with contextlib.suppress(Exception):
            self._call(shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


_PLURALS = {
    "Namespace": "namespaces",
    "ServiceAccount": "serviceaccounts",
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "ResourceQuota": "resourcequotas",
    "Secret": "secrets",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Deployment": "deployments",
    "DaemonSet": "daemonsets",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "CustomResourceDefinition": "customresourcedefinitions",
    "AuthorizationPolicy": "authorizationpolicies",
    "PeerAuthentication": "peerauthentications",
    "EndpointSlice": "endpointslices",
    "Lease": "leases",
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def collection_path(obj: dict[str, Any]) -> str:
    api_version, kind = obj.get("apiVersion", "v1"), obj["kind"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if kind in _CLUSTER_SCOPED:
        return f"{prefix}/{_PLURALS[kind]}"
    ns = obj["metadata"].get("namespace") or "default"
    return f"{prefix}/namespaces/{ns}/{_PLURALS[kind]}"


def daemonset_manifests() -> Iterator[dict[str, Any]]:
    """daemonset/ as kustomize lists it, with the two Kubernetes 1.20 stand-ins applied.

    1.20 predates DaemonSet ``maxSurge`` and PodDisruptionBudget ``policy/v1``
    (both 1.21); the manifests stay written for current clusters and the test
    adapts them, so the tier proves everything else in them as shipped.
    """
    base = ROOT / "daemonset"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((base / name).read_text()):
            if not doc:
                continue
            if doc["kind"] == "DaemonSet":
                rolling = doc["spec"].get("updateStrategy", {}).get("rollingUpdate", {})
                rolling.pop("maxSurge", None)
                if "maxUnavailable" in rolling and rolling["maxUnavailable"] == 0:
                    rolling["maxUnavailable"] = 1  # 1.20 refuses 0 without maxSurge
            if doc["kind"] == "PodDisruptionBudget" and doc["apiVersion"] == "policy/v1":
                doc["apiVersion"] = "policy/v1beta1"
            yield doc
