"""Processes started inside lab namespaces, and their orderly termination.

Every process runs through ``ip netns exec`` (which also remounts /sys for the
namespace, so tools that read /sys/class/net see the right interfaces) in its
own session, so :meth:`LabProcess.close` can signal the whole process group:
SIGTERM first, SIGKILL if it has not exited within the grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from lab.errors import LabError
from lab.netns import netns_path

__all__ = ["LabProcess", "netns_argv", "run_in_netns", "wait_listening"]


def netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so that it runs inside ``netns``.

    ``nsenter --net`` rather than ``ip netns exec``: the latter also remounts
    /sys for the namespace, which hides the host's bpffs at /sys/fs/bpf, and
    the agent must see the pins there.
    """
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


class LabProcess:
    """A process in a lab namespace. ``close()`` stops it; it is idempotent."""

    def __init__(
        self,
        netns: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.netns = netns
        self.stop_signal = stop_signal
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
            out: int | IO[bytes] | None = self._log
            err: int | IO[bytes] | None = subprocess.STDOUT
        else:
            out = stdout if stdout is not None else subprocess.DEVNULL
            err = subprocess.DEVNULL if stdout is None else None
        try:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                netns_argv(netns, argv),
                env=full_env,
                cwd=cwd,
                stdin=stdin,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise LabError(
                f"cannot start {argv[0]!r} in {netns}: {exc}",
                hint="check that the program is installed and the namespace exists",
            ) from exc
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def close(self, grace: float = 3.0) -> int | None:
        """Signal the process group (SIGTERM unless told otherwise), SIGKILL it after ``grace``."""
        if self.popen.poll() is None:
            self._signal(self.stop_signal)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(5.0)
            # Stragglers the leader left behind in its group (while any live,
            # the group id cannot have been reused by someone else).
            self._signal(signal.SIGKILL)
        self._close_log()
        return self.popen.returncode

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        """What the process wrote so far, when started with ``log_path``."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def __repr__(self) -> str:
        return f"LabProcess(pid={self.pid}, netns={self.netns!r}, argv={self.argv!r})"


def run_in_netns(
    netns: str, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion inside ``netns``; raise LabError if it fails."""
    try:
        done = subprocess.run(
            netns_argv(netns, argv), input=input, capture_output=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)} in {netns} failed: {exc}") from exc
    if done.returncode != 0:
        raise LabError(
            f"{' '.join(argv)} in {netns} exited {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()}",
            hint="the command's own message above says what it rejected",
        )
    return done


def _listening_ports(pid: int) -> set[int]:
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _in_netns(proc: LabProcess) -> bool:
    # Until `ip netns exec` has switched namespaces, /proc/<pid>/net shows the
    # parent's namespace, whose listeners must not count.
    try:
        return os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(netns_path(proc.netns)).st_ino
    except OSError:
        return False


def wait_listening(proc: LabProcess, port: int, timeout: float = 10.0) -> None:
    """Block until a TCP listener on ``port`` exists in the process's namespace.

    Reads /proc/<pid>/net/tcp, so readiness is checked without opening a
    connection the application would have to serve.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(
                f"{proc.argv[0]} exited with {proc.returncode} before listening on :{port}",
                hint=f"see its log {proc.log_path}" if proc.log_path else "run it by hand",
            )
        if _in_netns(proc) and port in _listening_ports(proc.pid):
            return
        time.sleep(0.01)
    raise LabError(
        f"nothing listens on :{port} in {proc.netns} after {timeout:.0f}s",
        hint="the process may be stuck or bound elsewhere; check its log",
    )
