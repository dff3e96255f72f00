"""Which process owns which lab prefix, and removal of labs whose owner died.

Several test sessions (and a demo) may run labs on one machine at once, so a
session-start cleanup must not delete a live lab. Each topology records its
owner (pid + process start time, so a recycled pid does not count) in
``/run/veil-lab/<prefix>.json`` *before* creating any namespace; a lab is stale
when that record is missing or its owner is gone.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
import signal
import time
from pathlib import Path

from lab.netns import list_netns, pids_in_netns, remove_netns

__all__ = [
    "OWNER_DIR",
    "PREFIX_GLOB",
    "claim",
    "cleanup_stale",
    "kill_netns_processes",
    "new_prefix",
    "release",
    "valid_prefix",
]

OWNER_DIR = Path("/run/veil-lab")
PREFIX_GLOB = "vt[0-9a-f][0-9a-f][0-9a-f][0-9a-f]"
_PREFIX_RE = re.compile(r"^vt[0-9a-f]{4}$")


def new_prefix() -> str:
    """A fresh random prefix, e.g. ``vt1a2b``, not used by any current namespace."""
    taken = {name.split("-", 1)[0] for name in list_netns()}
    for _ in range(64):
        prefix = "vt" + secrets.token_hex(2)
        if prefix not in taken and not (OWNER_DIR / f"{prefix}.json").exists():
            return prefix
    raise RuntimeError("no free lab prefix after 64 tries; run lab.cleanup_stale()")


def valid_prefix(prefix: str) -> bool:
    return bool(_PREFIX_RE.match(prefix))


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the ")" that ends the command name.
    return stat.rsplit(")", 1)[1].split()[19]


def claim(prefix: str) -> None:
    OWNER_DIR.mkdir(mode=0o755, exist_ok=True)
    pid = os.getpid()
    record = {"pid": pid, "start": _start_time(pid)}
    (OWNER_DIR / f"{prefix}.json").write_text(json.dumps(record))


def release(prefix: str) -> None:
    (OWNER_DIR / f"{prefix}.json").unlink(missing_ok=True)


def _owner_alive(prefix: str) -> bool:
    try:
        record = json.loads((OWNER_DIR / f"{prefix}.json").read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(_start_time(pid) == record.get("start"))


def kill_netns_processes(netns: str, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, every process living in ``netns`` (never ourselves)."""
    me = os.getpid()
    pids = [p for p in pids_in_netns(netns) if p != me]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.02)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def cleanup_stale(prefix_glob: str = PREFIX_GLOB, *, force: bool = False) -> list[str]:
    """Remove namespaces (and their processes) left by lab runs whose owner died.

    ``prefix_glob`` matches the prefix part of a namespace name (before the
    first "-"). With ``force`` live labs are removed too. Returns the removed
    namespace names. Everything a lab creates lives inside its namespaces, so
    removing them removes links, addresses, routes, rules and nft tables.
    """
    removed: list[str] = []
    for name in list_netns():
        prefix = name.split("-", 1)[0]
        if "-" not in name or not fnmatch.fnmatchcase(prefix, prefix_glob):
            continue
        if not force and _owner_alive(prefix):
            continue
        kill_netns_processes(name)
        remove_netns(name)
        removed.append(name)
    if OWNER_DIR.exists():
        for record in OWNER_DIR.glob("*.json"):
            prefix = record.stem
            if fnmatch.fnmatchcase(prefix, prefix_glob) and (force or not _owner_alive(prefix)):
                record.unlink(missing_ok=True)
    return removed
