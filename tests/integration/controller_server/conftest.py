"""A real controller for the server tests: ``veil controller run`` as a subprocess.

The controller listens on 127.0.0.1 with ports chosen by the kernel (``:0``);
the fixture reads the bound ports from the startup line. Nodes join with real
single-use tokens (written to the controller's token file, exactly as
``veil controller token create`` does) and watch over mutual TLS with
:class:`controller.api.client.ControllerClient`. Every process and file the
fixture creates is removed at the end, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.api.client import CONTROLLER_SERVER_NAME, ControllerClient, join_node
from controller.api.model import Resource, ResourceType, WatchUpdate, resource_key
from controller.api.spiffe import node_identity
from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from node import NodeCredentials, build_csr, generate_key, key_pem

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "registry.yaml"
_STARTUP = re.compile(r"veil controller serving: mTLS (\S+):(\d+), join (\S+):(\d+),")
START_TIMEOUT = 30.0


def veil_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.veil", *args]


@dataclass
class RunningController:
    proc: subprocess.Popen[str]
    state_dir: Path
    registry: Path
    stderr_path: Path
    mtls_port: int
    join_port: int
    startup_line: str
    work: Path

    @property
    def mtls(self) -> str:
        return f"127.0.0.1:{self.mtls_port}"

    @property
    def join_addr(self) -> str:
        return f"127.0.0.1:{self.join_port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def token(self, node: str) -> str:
        ca = CertificateAuthority.load(self.state_dir)
        return JoinTokenStore(self.state_dir).create(
            node, timedelta(minutes=10), ca_fingerprint=ca.fingerprint
        )

    async def join(self, node: str) -> NodeCredentials:
        return await join_with_token(self.state_dir, self.join_addr, self.mtls, node)

    def write_registry(self, doc: dict[str, Any] | str) -> None:
        """Replaces the registry file the way editors do: write aside, rename over."""
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.registry)

    def root_pem(self) -> bytes:
        return b"".join(CertificateAuthority.load(self.state_dir).trust_bundle().roots)

    async def health(self) -> int:
        """grpc.health.v1 status of the whole server, asked on the join listener."""
        creds = grpc.ssl_channel_credentials(root_certificates=self.root_pem())
        options = [("grpc.ssl_target_name_override", CONTROLLER_SERVER_NAME)]
        async with grpc.aio.secure_channel(self.join_addr, creds, options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(resp.status)


async def join_with_token(
    state_dir: Path, join_addr: str, mtls_addr: str, node: str
) -> NodeCredentials:
    """Identity.JoinNode with a fresh single-use token; returns the node's credentials.

    The token is created in the controller's token file as ``veil controller
    token create`` does. The CA root the token pins is taken from the state
    directory, so this is the real token exchange on the join listener without
    the first-contact probe of ``veil node join``.
    """
    ca = CertificateAuthority.load(state_dir)
    token = JoinTokenStore(state_dir).create(
        node, timedelta(minutes=10), ca_fingerprint=ca.fingerprint
    )
    (root,) = (r for r in ca.trust_bundle().roots if _fingerprint(r) == ca.fingerprint)
    key = generate_key()
    csr = build_csr(key, node_identity(ca.trust_domain, node))
    result = await join_node(join_addr, root, token, node, csr)
    return NodeCredentials(
        node=node,
        trust_domain=result.trust_domain,
        controller_address=mtls_addr,
        join_address=join_addr,
        key_pem=key_pem(key),
        cert_chain_pem=result.cert_chain,
        trust_bundle_pem=result.trust_bundle,
    )


def _fingerprint(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def example_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


def start_controller(work: Path, *extra: str) -> RunningController:
    state_dir = work / "state"
    registry = work / "registry.yaml"
    if not registry.exists():
        registry.write_text(EXAMPLE.read_text())
    stderr_path = work / "controller.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}
    argv = veil_argv(
        "controller",
        "run",
        "--registry",
        str(registry),
        "--state-dir",
        str(state_dir),
        "--listen",
        "127.0.0.1:0",
        "--join-listen",
        "127.0.0.1:0",
        "--registry-poll",
        "0.2",
        *extra,
    )
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
    deadline = time.monotonic() + START_TIMEOUT
    assert proc.stdout is not None
    line = ""
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = _STARTUP.search(line)
            if m:
                return RunningController(
                    proc, state_dir, registry, stderr_path, int(m[2]), int(m[4]), line, work
                )
        raise AssertionError(
            f"controller did not start (exit {proc.poll()}):\n{stderr_path.read_text()}"
        )
    except BaseException:
        stop_process(proc)
        raise


def stop_process(proc: subprocess.Popen[str]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[RunningController]:
    ctrl = start_controller(tmp_path)
    try:
        yield ctrl
    finally:
        stop_process(ctrl.proc)


class Watcher:
    """One node's watch stream, with the state it holds after applying updates."""

    def __init__(self, client: ControllerClient, stream: AsyncIterator[WatchUpdate]) -> None:
        self.client = client
        self._stream = stream
        self.held: dict[tuple[ResourceType, str], Resource] = {}
        self.epoch = ""
        self.version = 0
        self.bundle: tuple[bytes, ...] = ()
        self._next: asyncio.Task[WatchUpdate] | None = None

    @classmethod
    async def open(
        cls,
        creds: NodeCredentials,
        epoch: str = "",
        version: int = 0,
        types: tuple[ResourceType, ...] = (),
    ) -> Watcher:
        client = creds.client()
        return cls(client, client.watch(creds.node, types, epoch, version))

    async def next(self, timeout: float = 10.0) -> WatchUpdate:
        """The next update. On timeout the read stays pending (the stream is not
        cancelled), so a later call still gets that update."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._stream))
        done, _ = await asyncio.wait({self._next}, timeout=timeout)
        if not done:
            raise TimeoutError(f"no watch update within {timeout} s")
        task, self._next = self._next, None
        update = task.result()
        if update.snapshot:
            self.held.clear()
        for r in update.upserts:
            self.held[resource_key(r)] = r
        for k in update.removals:
            self.held.pop(k, None)
        self.epoch, self.version = update.epoch, update.version
        if update.trust_bundle is not None:
            self.bundle = update.trust_bundle.roots
        return update

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(BaseException):
                await self._next
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()
        await self.client.close()
