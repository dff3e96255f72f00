"""Process limits and kernel settings the ztunnel needs at start.

**Open files.**
Every proxied connection holds two sockets (more while an HBONE tunnel is
being set up), so the common inherited soft limit of 1,024 caps a node at
about 500 connections: past it ``accept()`` fails with EMFILE and new
connections wait in the kernel's queue until they time out. The hard limit is
usually far higher and an unprivileged process may raise its soft limit up to
it, so the ztunnel does so at start and says when even that is low.

**Handing queued connections to a surge instance.** On SIGTERM the ztunnel
closes its listeners so that a new instance bound to the same ports
(SO_REUSEPORT) gets every new connection. Connections the kernel already
completed but the old listener had not accepted yet would be reset with it,
unless ``net.ipv4.tcp_migrate_req`` (Linux 5.14+, per network namespace) lets
the kernel move them to another listener of the group; the ztunnel turns it
on where it may.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOW_NOFILE",
    "NofilePlan",
    "enable_request_migration",
    "plan_nofile",
    "raise_nofile_limit",
]

log = logging.getLogger("veil.ztunnel")

# Below this many descriptors a busy node runs out (about 8,000 connections).
LOW_NOFILE = 16384


@dataclass(frozen=True, slots=True)
class NofilePlan:
    """What to set the soft limit to, and the warning to log, if any."""

    soft: int
    hard: int
    target: int
    warning: str | None


def plan_nofile(soft: int, hard: int, low: int = LOW_NOFILE) -> NofilePlan:
    """The soft limit goes to the hard limit (never down); warns when the
    result stays under ``low``."""
    unlimited = resource.RLIM_INFINITY
    target = hard if hard == unlimited or (soft != unlimited and hard > soft) else soft
    warning = None
    if target != unlimited and target < low:
        warning = (
            f"open-file limit is {target} (soft {soft}, hard {hard}), below {low}: at about "
            f"{target // 2} connections new ones stall; raise the hard limit "
            f"(LimitNOFILE= for systemd, ulimit -Hn, or the container runtime's default "
            f"nofile ulimit) to at least {low}"
        )
    return NofilePlan(soft, hard, target, warning)


def raise_nofile_limit(low: int = LOW_NOFILE) -> NofilePlan:
    """Raises this process's RLIMIT_NOFILE soft limit to the hard limit and
    logs one warning line when it stays low. Returns what it decided."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = plan_nofile(soft, hard, low)
    if plan.target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan.target, hard))
        except (ValueError, OSError) as e:
            # Some sandboxes refuse even a raise within the hard limit.
            plan = NofilePlan(soft, hard, soft, plan_nofile(soft, soft, low).warning)
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
        else:
            log.info("open-file limit raised from %d to %d", soft, plan.target)
    if plan.warning is not None:
        log.warning("%s", plan.warning)
    return plan


_MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def enable_request_migration(path: Path = _MIGRATE_REQ) -> bool:
    """Turns ``tcp_migrate_req`` on in this network namespace; True when it is on.

    Best effort: a read-only /proc/sys (most containers) or an older kernel
    leaves it off, and the only cost is that a handful of connections racing
    a rolling update are reset instead of handed over.
    """
    try:
        if path.read_text().strip() == "1":
            return True
        path.write_text("1\n")
    except OSError as e:
        log.info(
            "net.ipv4.tcp_migrate_req not enabled (%s): connections queued at shutdown "
            "are reset rather than handed to a surge ztunnel",
            e.strerror or e,
        )
        return False
    log.info("enabled net.ipv4.tcp_migrate_req: queued connections move to a surge ztunnel")
    return True
