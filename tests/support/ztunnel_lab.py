"""The mesh the ztunnel's netns tests run on, and helpers to act as its pods.

One :class:`lab.mesh.LabMesh` per module: ``veil controller run`` in the
underlay namespace, two joined nodes each running ``veil ztunnel run`` and
``veil agent run``, pods steered by the agent's eBPF programs. The same tests
also pass on the nftables TPROXY steering that preceded it
(``VEIL_ZTUNNEL_TEST_STEERING=tproxy``).
Tests that change the registry restore it before they end. Everything the
mesh creates is removed when the module ends, also on failure.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from lab.apps import TcpServer, serve
from lab.mesh import LabMesh
from lab.netns import in_netns

__all__ = [
    "APP_PORT",
    "NODE_A",
    "NODE_B",
    "REGISTRY",
    "STEERING",
    "Lab",
    "connect_from",
    "expect_refused",
    "revoke_policy",
    "running_lab",
]

NODE_A, NODE_B = "node-a", "node-b"
STEERING = os.environ.get("VEIL_ZTUNNEL_TEST_STEERING", "ebpf")
APP_PORT = 8080

# node-a: checkout, other, intruder (shop, enrolled), legacy-client (plain)
# node-b: payments, inventory (shop, enrolled), batch (opted out), legacy-server (plain)
# Service shop/payments: VIPs 10.96.0.20 and fd00:96::20, :80 -> payments:8081 (whoami).
# Dual stack: every pod also has the IPv6 address the lab gives it
# (10.244.<n>.<h> -> fd00:244:<n>::<h in hex>).
# payments accepts only checkout; other accepts only checkout; inventory accepts
# anyone, plaintext included (PERMISSIVE for app=inventory); shop is STRICT.
REGISTRY: dict[str, Any] = {
    "trustDomain": "cluster.local",
    "namespaces": [
        {"name": "shop", "labels": {"veil.io/dataplane-mode": "ambient"}},
        {"name": "legacy"},
    ],
    "workloads": [
        {"name": "checkout", "namespace": "shop", "serviceAccount": "checkout",
         "node": NODE_A, "ips": ["10.244.1.10", "fd00:244:1::a"], "labels": {"app": "checkout"}},
        {"name": "other", "namespace": "shop", "serviceAccount": "other",
         "node": NODE_A, "ips": ["10.244.1.11", "fd00:244:1::b"], "labels": {"app": "other"}},
        {"name": "intruder", "namespace": "shop", "serviceAccount": "intruder",
         "node": NODE_A, "ips": ["10.244.1.13", "fd00:244:1::d"], "labels": {"app": "intruder"}},
        {"name": "legacy-client", "namespace": "legacy", "serviceAccount": "default",
         "node": NODE_A, "ips": ["10.244.1.12", "fd00:244:1::c"], "labels": {"app": "legacy-client"}},
        {"name": "payments", "namespace": "shop", "serviceAccount": "payments",
         "node": NODE_B, "ips": ["10.244.2.10", "fd00:244:2::a"], "labels": {"app": "payments"}},
        {"name": "inventory", "namespace": "shop", "serviceAccount": "inventory",
         "node": NODE_B, "ips": ["10.244.2.13", "fd00:244:2::d"], "labels": {"app": "inventory"}},
        {"name": "batch", "namespace": "shop", "serviceAccount": "batch",
         "node": NODE_B, "ips": ["10.244.2.11", "fd00:244:2::b"],
         "labels": {"app": "batch", "veil.io/dataplane-mode": "none"}},
        {"name": "legacy-server", "namespace": "legacy", "serviceAccount": "default",
         "node": NODE_B, "ips": ["10.244.2.12", "fd00:244:2::c"], "labels": {"app": "legacy-server"}},
    ],
    "services": [
        {"name": "payments", "namespace": "shop", "vips": ["10.96.0.20", "fd00:96::20"],
         "ports": [{"name": "http", "port": 80, "targetPort": 8081}],
         "selector": {"app": "payments"}},
    ],
    "authorizationPolicies": [
        {"name": "payments-allow-checkout", "namespace": "shop", "spec": {
            "selector": {"matchLabels": {"app": "payments"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/checkout"]}}]}],
        }},
        {"name": "other-allow-checkout", "namespace": "shop", "spec": {
            "selector": {"matchLabels": {"app": "other"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/checkout"]}}]}],
        }},
    ],
    "peerAuthentications": [
        {"name": "default", "namespace": "shop", "spec": {"mtls": {"mode": "STRICT"}}},
        {"name": "inventory", "namespace": "shop", "spec": {
            "selector": {"matchLabels": {"app": "inventory"}},
            "mtls": {"mode": "PERMISSIVE"},
        }},
    ],
}  # fmt: skip


class Lab:
    """The running mesh plus the apps serving in its pods."""

    def __init__(self, mesh: LabMesh) -> None:
        self.mesh = mesh
        self.apps: list[TcpServer] = []

    def serve(self, pod: str, app: str, port: int = APP_PORT) -> TcpServer:
        server = serve(self.mesh.pod(pod).lab.netns, app, port)
        self.apps.append(server)
        return server

    def ip(self, pod: str) -> str:
        return self.mesh.pod(pod).ip

    def ip6(self, pod: str) -> str:
        return self.mesh.pod(pod).ip6

    def set_registry(self, mutate: Callable[[dict[str, Any]], None]) -> None:
        self.mesh.update_registry(mutate)

    def restore_registry(self) -> None:
        def reset(doc: dict[str, Any]) -> None:
            doc.clear()
            doc.update(copy.deepcopy(REGISTRY))

        self.mesh.update_registry(reset)

    def wait_state(self, node: str, predicate: Callable[[dict[str, Any]], bool]) -> None:
        """Waits (bounded) until ``node``'s /config_dump satisfies ``predicate``."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if predicate(self.mesh.config_dump(node)):
                return
            time.sleep(0.1)
        raise AssertionError(f"{node} did not reach the expected state")

    def log(self, node: str) -> str:
        return self.mesh.ztunnels[node].log_text()

    def wait_log(self, node: str, text: str, timeout: float = 5.0) -> str:
        """Waits (bounded) until ``node``'s ztunnel log contains ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log(node)
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in {node}'s ztunnel log:\n{self.log(node)[-3000:]}")


@contextlib.contextmanager
def running_lab(
    work: Path,
    apps: Sequence[tuple[str, str, int]],
    *,
    steering: str = "ebpf",
    extra_ztunnel_args: Sequence[str] = (),
    ztunnel_workers: int | None = None,
    ready: Callable[[LabMesh], None] | None = None,
) -> Iterator[Lab]:
    """A mesh on :data:`REGISTRY` under ``work``, serving ``apps`` (pod, app, port).

    ``ready(mesh)`` runs after the mesh started and before the apps serve.
    Apps and mesh are stopped on the way out, also on failure.
    """
    registry = work / "registry.yaml"
    registry.write_text(yaml.safe_dump(REGISTRY, sort_keys=False))
    (work / "mesh").mkdir()
    mesh = LabMesh(
        registry,
        workdir=work / "mesh",
        steering=steering,
        extra_ztunnel_args=extra_ztunnel_args,
        ztunnel_workers=ztunnel_workers,
    )
    the_lab = Lab(mesh)
    try:
        mesh.start()
        if ready is not None:
            ready(mesh)
        for pod, app, port in apps:
            the_lab.serve(pod, app, port)
        yield the_lab
    finally:
        for server in the_lab.apps:
            server.stop()
        mesh.close()


def connect_from(lab: Lab, pod: str, dst_ip: str, port: int, timeout: float = 10) -> socket.socket:
    """A TCP connection made inside ``pod`` (the pod's own stack, so it is steered)."""
    with in_netns(lab.mesh.pod(pod).lab.netns):
        return socket.create_connection((dst_ip, port), timeout=timeout)


def expect_refused(lab: Lab, pod: str, dst_ip: str, port: int) -> None:
    """A connection from ``pod`` is reset (or closed) before a single byte arrives.

    The ztunnel accepts first (the steering completes the handshake) and then
    resets, so the reset may already be there when connect() returns.
    """
    try:
        sock = connect_from(lab, pod, dst_ip, port)
    except ConnectionResetError:
        return
    sock.settimeout(5)
    with sock:
        try:
            data = sock.recv(1024)
        except ConnectionResetError:
            return
        assert data == b"", f"received {data!r} from a connection that should be refused"


def revoke_policy(name: str) -> Callable[[dict[str, Any]], None]:
    """A registry edit for :meth:`Lab.set_registry`: the ALLOW policy ``name``
    now admits nobody real, so its live connections must close."""

    def edit(doc: dict[str, Any]) -> None:
        (policy,) = [p for p in doc["authorizationPolicies"] if p["name"] == name]
        policy["spec"]["rules"][0]["from"][0]["source"]["principals"] = [
            "cluster.local/ns/shop/sa/nobody"
        ]

    return edit
