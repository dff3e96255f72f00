"""A real controller (``veil controller run`` as a subprocess) for the ztunnel core tests.

The controller listens on 127.0.0.1 with kernel-chosen ports, read from its
startup line; it can be stopped and started again on the same ports and state
directory to simulate an outage. Every process the fixture starts is stopped
at the end, also on failure; files live in pytest's tmp_path.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "registry.yaml"
_STARTUP = re.compile(r"veil controller serving: mTLS (\S+):(\d+), join (\S+):(\d+),")
START_TIMEOUT = 30.0


@dataclass
class ControllerProcess:
    work: Path
    extra: tuple[str, ...]
    mtls_port: int = 0
    join_port: int = 0
    proc: subprocess.Popen[str] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.work / "state"

    @property
    def registry(self) -> Path:
        return self.work / "registry.yaml"

    @property
    def mtls(self) -> str:
        return f"127.0.0.1:{self.mtls_port}"

    @property
    def join_addr(self) -> str:
        return f"127.0.0.1:{self.join_port}"

    def start(self) -> None:
        """Starts (or restarts, on the same ports and state) the controller."""
        assert self.proc is None or self.proc.poll() is not None
        if not self.registry.exists():
            self.registry.write_text(EXAMPLE.read_text())
        self.starts += 1
        log = self.work / f"controller-{self.starts}.stderr"
        self.logs.append(log)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}
        argv = [
            sys.executable, "-m", "agent.cli.veil", "controller", "run",
            "--registry", str(self.registry),
            "--state-dir", str(self.state_dir),
            "--listen", f"127.0.0.1:{self.mtls_port}",
            "--join-listen", f"127.0.0.1:{self.join_port}",
            "--registry-poll", "0.2",
            *self.extra,
        ]  # fmt: skip
        with log.open("w") as err:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
            )
        self.proc = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = _STARTUP.search(line)
            if m:
                self.mtls_port, self.join_port = int(m[2]), int(m[4])
                return
        self.stop()
        raise AssertionError(f"controller did not start:\n{self.stderr()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    def stderr(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def token(self, node: str) -> str:
        ca = CertificateAuthority.load(self.state_dir)
        return JoinTokenStore(self.state_dir).create(
            node, timedelta(minutes=10), ca_fingerprint=ca.fingerprint
        )

    def write_registry(self, doc: dict[str, Any]) -> None:
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.registry)


def example_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    # Workload certificates live 6 s, so rotation at half-life is seen within seconds.
    ctrl = ControllerProcess(tmp_path, ("--default-ttl", "6s"))
    ctrl.start()
    try:
        yield ctrl
    finally:
        ctrl.stop()
