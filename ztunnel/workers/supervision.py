"""Pure decisions of the worker supervisor: how many workers, when to restart.

Nothing here does I/O, so every rule has a table test:

- :func:`default_workers`: the CPUs this process may run on, capped at
  :data:`MAX_DEFAULT_WORKERS` (past that, one Python process per core costs
  memory for little gain on a node whose pods want the cores too);
- :func:`resolve_workers`: the count actually run, with the warning to log
  when the kernel cannot steer onto a reuseport group;
- :class:`RestartPolicy`: the delay before a crashed worker is started again
  (exponential while it keeps crashing soon after start, reset once a worker
  stayed up; bounded, and never "give up": the others keep serving and an
  operator sees the crash loop in the log and in readiness).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_DEFAULT_WORKERS",
    "MAX_WORKERS",
    "REUSEPORT_ASSIGN_KERNEL",
    "RestartPolicy",
    "WorkerCount",
    "default_workers",
    "kernel_version",
    "resolve_workers",
]

MAX_DEFAULT_WORKERS = 8
MAX_WORKERS = 64
# bpf_sk_assign() accepts a listener in an SO_REUSEPORT group, and the kernel
# then re-selects within the group, from Linux 6.5 on (by the kernel history;
# earlier kernels refuse the assignment for reuseport sockets).
REUSEPORT_ASSIGN_KERNEL = (6, 5)
_RELEASE_RE = re.compile(r"^(\d+)\.(\d+)")


def default_workers(cpus: int) -> int:
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def kernel_version(release: str) -> tuple[int, int] | None:
    """``"6.18.0-1-amd64"`` -> ``(6, 18)``; None when it cannot be read."""
    m = _RELEASE_RE.match(release)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True, slots=True)
class WorkerCount:
    workers: int
    warning: str | None = None


def resolve_workers(
    requested: int | None, cpus: int, kernel_release: str, *, steering: bool = True
) -> WorkerCount:
    """The number of workers to run.

    ``requested`` None means the default for ``cpus``. With the node's eBPF
    steering (``steering``), more than one worker needs a kernel that lets
    ``bpf_sk_assign`` pick a reuseport listener; on an older (or unreadable)
    kernel this falls back to one worker and says why.
    """
    n = default_workers(cpus) if requested is None else requested
    if n <= 1 or not steering:
        return WorkerCount(max(1, n))
    version = kernel_version(kernel_release)
    if version is None or version < REUSEPORT_ASSIGN_KERNEL:
        need = ".".join(map(str, REUSEPORT_ASSIGN_KERNEL))
        return WorkerCount(
            1,
            f"running 1 worker instead of {n}: kernel {kernel_release!r} is older than "
            f"{need} (or unreadable), where bpf_sk_assign cannot steer onto a listener "
            f"shared by several workers (SO_REUSEPORT). Upgrade the node's kernel to "
            f"{need}+ for a multi-core ztunnel, or pass --workers 1 to silence this",
        )
    return WorkerCount(n)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Delay before restarting a worker that exited unexpectedly."""

    initial: float = 0.5
    maximum: float = 30.0
    # A worker that ran this long before exiting was healthy: start over.
    stable_after: float = 30.0

    def delay(self, crashes_in_a_row: int) -> float:
        """Delay for the ``crashes_in_a_row``-th consecutive early crash (1-based)."""
        if crashes_in_a_row <= 1:
            return self.initial
        return min(self.maximum, self.initial * 2.0 ** min(crashes_in_a_row - 1, 30))

    def next_streak(self, streak: int, uptime: float) -> int:
        """The crash streak after a worker that ran ``uptime`` seconds exited."""
        return 1 if uptime >= self.stable_after else streak + 1
