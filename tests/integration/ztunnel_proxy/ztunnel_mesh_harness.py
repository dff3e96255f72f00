"""A real controller and joined nodes for the ztunnel proxy tests.

Shared by the loopback tests (``tests/integration/ztunnel_proxy``) and the
network-namespace tests (``tests/netns/ztunnel``, which load this file by
path). The controller is ``veil controller run`` as a subprocess, optionally
inside a network namespace; nodes join it with real single-use tokens through
:func:`node.join` (CA pinning included). Every process is stopped
by :meth:`ControllerProcess.stop`, which the fixtures call in ``finally``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from lab.process import netns_argv
from node import NodeCredentials, join

REPO = Path(__file__).resolve().parents[3]
_STARTUP = re.compile(r"veil controller serving: mTLS (\S+):(\d+), join (\S+):(\d+),")
START_TIMEOUT = 30.0


def veil_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.veil", *args]


def clean_env() -> dict[str, str]:
    """The environment without VEIL_* settings of the caller."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}


@dataclass
class ControllerProcess:
    """``veil controller run`` on ``host``; restartable on the same ports and state."""

    work: Path
    registry_doc: dict[str, Any]
    host: str = "127.0.0.1"
    netns: str | None = None
    extra: tuple[str, ...] = ()
    mtls_port: int = 0
    join_port: int = 0
    proc: subprocess.Popen[str] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.work / "controller-state"

    @property
    def registry(self) -> Path:
        return self.work / "registry.yaml"

    @property
    def mtls(self) -> str:
        return f"{self.host}:{self.mtls_port}"

    @property
    def join_addr(self) -> str:
        return f"{self.host}:{self.join_port}"

    def start(self) -> None:
        assert self.proc is None
        if not self.registry.exists():
            self.write_registry(self.registry_doc)
        log = self.work / f"controller-{len(self.logs) + 1}.log"
        self.logs.append(log)
        argv = veil_argv(
            "controller", "run",
            "--registry", str(self.registry),
            "--state-dir", str(self.state_dir),
            "--listen", f"{self.host}:{self.mtls_port}",
            "--join-listen", f"{self.host}:{self.join_port}",
            "--registry-poll", "0.1",
            *self.extra,
        )  # fmt: skip
        if self.netns is not None:
            argv = netns_argv(self.netns, argv)
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=clean_env(),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = _STARTUP.search(line)
            if m:
                self.mtls_port, self.join_port = int(m[2]), int(m[4])
                return
        self.stop()
        raise AssertionError(f"controller did not start:\n{self.log_text()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def write_registry(self, doc: dict[str, Any]) -> None:
        """Replaces the registry file the way editors do: write aside, rename over."""
        self.registry_doc = doc
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.registry)

    def token(self, node: str) -> str:
        ca = CertificateAuthority.load(self.state_dir)
        return JoinTokenStore(self.state_dir).create(
            node, timedelta(minutes=10), ca_fingerprint=ca.fingerprint
        )

    async def join(self, node: str, state_dir: Path) -> NodeCredentials:
        """``veil node join`` for ``node``: a real token, CA pinned from it."""
        return await join(self.join_addr, self.token(node), node, state_dir, mtls_address=self.mtls)


def workload(
    name: str, namespace: str, node: str, ip: str, sa: str | None = None, **labels: str
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "serviceAccount": sa or name,
        "node": node,
        "ips": [ip],
        "labels": {"app": name, **labels},
    }


def allow_from(
    name: str, app: str, principals: list[str], namespace: str = "shop"
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": principals}}]}],
        },
    }


def peer_auth(mode: str, namespace: str = "shop") -> dict[str, Any]:
    return {"name": "default", "namespace": namespace, "spec": {"mtls": {"mode": mode}}}


def mesh_doc(
    workloads: list[dict[str, Any]],
    *,
    policies: Sequence[dict[str, Any]] = (),
    peer_auths: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A registry: namespace ``shop`` enrolled, ``legacy`` not."""
    return {
        "trustDomain": "cluster.local",
        "namespaces": [
            {"name": "shop", "labels": {"veil.io/dataplane-mode": "ambient"}},
            {"name": "legacy"},
        ],
        "workloads": workloads,
        "authorizationPolicies": list(policies),
        "peerAuthentications": list(peer_auths),
    }
