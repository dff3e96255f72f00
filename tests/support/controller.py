"""``veil controller run`` as a subprocess: the one controller-process helper.

Used by the integration tiers, the netns tiers and the benchmarks. The helper
starts the real command line (optionally inside a network namespace), reads
the bound addresses from its startup line, and stops the whole process group
on :meth:`ControllerProcess.stop`, which callers put in ``finally``. It is
restartable on the same ports and state directory, which is how the tests
simulate a controller outage. Files live in the caller's work directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.api.client import CONTROLLER_SERVER_NAME, join_node
from controller.api.spiffe import node_identity
from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from lab.process import netns_argv
from node import NodeCredentials, build_csr, generate_key, join, key_pem

__all__ = [
    "EXAMPLE",
    "REPO",
    "ControllerProcess",
    "clean_env",
    "example_doc",
    "join_with_token",
    "stop_process",
    "veil_argv",
]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "registry.yaml"
START_TIMEOUT = 30.0
_STARTUP = re.compile(r"veil controller serving: mTLS (\S+):(\d+), join (\S+):(\d+),")


def veil_argv(*args: str) -> list[str]:
    """The umbrella ``veil`` command line, run with this interpreter."""
    return [sys.executable, "-m", "cli.veil", *args]


def clean_env() -> dict[str, str]:
    """The environment without the caller's VEIL_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}


def example_doc() -> dict[str, Any]:
    """``examples/registry.yaml``, parsed."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


def stop_process(proc: subprocess.Popen[str], grace: float = 10.0) -> int | None:
    """SIGTERM to the process group, SIGKILL after ``grace``; returns the exit code."""
    if proc.poll() is None:
        _killpg(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _killpg(proc, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


def _killpg(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@dataclass
class ControllerProcess:
    """``veil controller run`` on ``host``; restartable on the same ports and state.

    ``registry_doc`` (a dict or YAML text) is written to :attr:`registry` on the
    first start unless that file exists. With neither a document nor
    ``registry_path`` no registry flags are passed: the caller names the
    source in ``extra`` (``--source kubernetes ...``). Port 0 lets the kernel
    choose; the chosen ports are read from the startup line and kept, so a
    restart binds the same ones.
    """

    work: Path
    registry_doc: dict[str, Any] | str | None = None
    host: str = "127.0.0.1"
    netns: str | None = None
    extra: tuple[str, ...] = ()
    mtls_port: int = 0
    join_port: int = 0
    registry_poll: float | None = 0.1
    log_level: str | None = None
    start_timeout: float = START_TIMEOUT
    state_path: Path | None = None
    registry_path: Path | None = None
    proc: subprocess.Popen[str] | None = None
    startup_line: str = ""
    stdout_lines: list[str] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    _reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def state_dir(self) -> Path:
        return self.state_path or self.work / "controller-state"

    @property
    def registry(self) -> Path:
        return self.registry_path or self.work / "registry.yaml"

    @property
    def mtls(self) -> str:
        return f"{self.host}:{self.mtls_port}"

    @property
    def join_addr(self) -> str:
        return f"{self.host}:{self.join_port}"

    @property
    def log_path(self) -> Path:
        """The stderr log of the current (or last) run."""
        return self.logs[-1] if self.logs else self._next_log()

    def argv(self) -> list[str]:
        args: list[str] = []
        if self.log_level is not None:
            args += ["--log-level", self.log_level]
        args += ["controller", "run"]
        if self.registry_doc is not None or self.registry_path is not None:
            args += ["--registry", str(self.registry)]
            if self.registry_poll is not None:
                args += ["--registry-poll", str(self.registry_poll)]
        args += [
            "--state-dir", str(self.state_dir),
            "--listen", f"{self.host}:{self.mtls_port}",
            "--join-listen", f"{self.host}:{self.join_port}",
            *self.extra,
        ]  # fmt: skip
        argv = veil_argv(*args)
        return argv if self.netns is None else netns_argv(self.netns, argv)

    def start(self) -> ControllerProcess:
        """Starts the controller and waits for its startup line; stops it on failure."""
        assert self.proc is None, "already running"
        if self.registry_doc is not None and not self.registry.exists():
            self.write_registry(self.registry_doc)
        log = self._next_log()
        self.logs.append(log)
        # The health endpoint's default is a fixed loopback port, which parallel test
        # controllers would fight over; a test that wants it passes --health-addr.
        # Tests edit registries on purpose, often removing every policy: the 5 s
        # hold that guards production against a torn file would only slow them
        # (the hold itself is tested with its own explicit setting).
        env = {**clean_env(), "VEIL_HEALTH_ADDR": "off", "VEIL_REGISTRY_HOLD": "1"}
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        started = threading.Event()
        # A thread, not a blocking readline here: a controller that hangs before
        # printing must not hang the test past start_timeout. It keeps draining
        # stdout afterwards, so the pipe can never fill and block the controller.
        self._reader = threading.Thread(
            target=self._read_stdout, args=(self.proc, started), daemon=True
        )
        self._reader.start()
        if started.wait(self.start_timeout) and self.startup_line:
            m = _STARTUP.search(self.startup_line)
            assert m is not None
            self.mtls_port, self.join_port = int(m[2]), int(m[4])
            return self
        code = self.stop()
        raise AssertionError(
            f"controller did not start within {self.start_timeout:.0f} s "
            f"(exit {code}):\n{self.log_text()[-4000:]}"
        )

    def _read_stdout(self, proc: subprocess.Popen[str], started: threading.Event) -> None:
        # This thread owns the pipe and closes it at EOF: closing it from another
        # thread while a read is blocked would wait on the reader's lock.
        assert proc.stdout is not None
        with proc.stdout, contextlib.suppress(ValueError, OSError):
            for line in proc.stdout:
                self.stdout_lines.append(line)
                if not started.is_set() and _STARTUP.search(line):
                    self.startup_line = line.strip()
                    started.set()
        started.set()  # EOF: the process exited before (or after) starting

    def stop(self, grace: float = 10.0) -> int | None:
        """Stops the process group; idempotent. Returns the exit code of the run."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        code = stop_process(proc, grace)
        if self._reader is not None:
            self._reader.join(5.0)  # EOF follows the exit at once
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the controller wrote to stderr, over all runs."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def stderr(self) -> str:
        """The stderr of the current (or last) run."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def write_registry(self, doc: dict[str, Any] | str) -> None:
        """Replaces the registry file the way editors do: write aside, rename over."""
        if not isinstance(doc, str):
            self.registry_doc = doc
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.registry)

    def token(self, node: str) -> str:
        """A single-use join token, created as ``veil controller token create`` does."""
        ca = CertificateAuthority.load(self.state_dir)
        return JoinTokenStore(self.state_dir).create(
            node, timedelta(minutes=10), ca_fingerprint=ca.fingerprint
        )

    async def join(self, node: str, state_dir: Path | None = None) -> NodeCredentials:
        """Joins ``node`` with a real token.

        With ``state_dir``: ``veil node join`` (CA pinned from the token, credentials
        stored there). Without: the token exchange alone, credentials in memory.
        """
        if state_dir is None:
            return await join_with_token(self.state_dir, self.join_addr, self.mtls, node)
        return await join(self.join_addr, self.token(node), node, state_dir, mtls_address=self.mtls)

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

    def _next_log(self) -> Path:
        n = len(self.logs) + 1
        return self.work / ("controller.log" if n == 1 else f"controller-{n}.log")


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
