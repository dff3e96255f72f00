"""Named network namespaces: create, enter (per thread), list, remove, find processes.

Namespaces are created the way ``ip netns add`` does it (a bind mount of the
namespace file under ``/run/netns``), so ``ip netns list`` and ``ip netns exec``
see them, but without forking a helper process: the calling thread unshares,
the namespace is bind-mounted, and the thread returns to where it was. That
keeps building a topology of a dozen namespaces well under a second.

:func:`in_netns` moves only the *current thread* (``setns(2)`` is per thread for
network namespaces). Sockets keep the namespace they were created in for their
whole life, so a socket opened inside ``with in_netns(pod.netns):`` stays in the
pod after the block ends; that is exactly how tests act as a pod. Threads and
child processes started while inside are born in that namespace too (clone
copies the caller's namespaces), so do not create thread pools or event-loop
executors inside the block unless they are meant to live there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from lab.errors import LabError

__all__ = [
    "NETNS_RUN_DIR",
    "create_netns",
    "in_netns",
    "list_netns",
    "netns_exists",
    "netns_path",
    "pids_in_netns",
    "remove_netns",
    "write_sysctl",
]

NETNS_RUN_DIR = Path("/run/netns")

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str, name: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise LabError(
            f"{what} for network namespace {name!r} failed: {os.strerror(err)}",
            hint="the lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)",
        )


def netns_path(name: str) -> Path:
    """Path of a named namespace, or ``name`` itself when it is already a path."""
    if name.startswith("/"):
        return Path(name)
    return NETNS_RUN_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    """Names under /run/netns, like ``ip netns list``."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def _prepare_run_dir() -> None:
    # Same dance as iproute2: make /run/netns a shared mount point so mounts of
    # namespace files propagate to other mount namespaces (e.g. `ip netns exec`).
    NETNS_RUN_DIR.mkdir(mode=0o755, exist_ok=True)
    rundir = str(NETNS_RUN_DIR).encode()
    if _libc.mount(b"", rundir, b"none", _MS_SHARED | _MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:
        _check(-1, "sharing /run/netns", str(NETNS_RUN_DIR))
    _check(_libc.mount(rundir, rundir, b"none", _MS_BIND | _MS_REC, None), "binding", "/run/netns")
    _check(_libc.mount(b"", rundir, b"none", _MS_SHARED | _MS_REC, None), "sharing", "/run/netns")


def create_netns(name: str) -> Path:
    """Create the named namespace; raise LabError if it already exists."""
    _prepare_run_dir()
    path = netns_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
    except FileExistsError:
        raise LabError(
            f"network namespace {name!r} already exists",
            hint="a crashed run may have left it behind: call lab.cleanup_stale()",
        ) from None
    os.close(fd)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(_CLONE_NEWNET), "unshare", name)
        try:
            rc = _libc.mount(
                b"/proc/thread-self/ns/net", str(path).encode(), b"none", _MS_BIND, None
            )
            _check(rc, "bind-mounting", name)
        finally:
            _check(_libc.setns(home, _CLONE_NEWNET), "returning from", name)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(home)
    return path


def remove_netns(name: str) -> None:
    """Unmount and unlink a named namespace (idempotent).

    The kernel frees the namespace, and every interface in it, once the last
    process and socket inside are gone.
    """
    path = netns_path(name)
    _libc.umount2(str(path).encode(), _MNT_DETACH)
    with suppress(FileNotFoundError):
        path.unlink()


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the current thread inside the named namespace.

    Sockets created in the block stay in that namespace after it ends; threads
    and child processes started in it are born there. Other threads are not
    affected.
    """
    try:
        target = os.open(netns_path(name), os.O_RDONLY)
    except FileNotFoundError:
        raise LabError(
            f"network namespace {name!r} does not exist",
            hint="build the topology first, and do not use it after close()",
        ) from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.setns(target, _CLONE_NEWNET), "entering", name)
        try:
            yield
        finally:
            _check(_libc.setns(home, _CLONE_NEWNET), "leaving", name)
    finally:
        os.close(target)
        os.close(home)


def write_sysctl(key: str, value: str | int) -> None:
    """Write a sysctl in the current thread's namespace (``net.ipv4.ip_forward``)."""
    # /proc/sys/net resolves against the calling task, so this honours in_netns().
    path = Path("/proc/sys") / key.replace(".", "/")
    path.write_text(f"{value}\n")


def pids_in_netns(name: str) -> list[int]:
    """Pids of processes whose network namespace is the named one."""
    try:
        st = os.stat(netns_path(name))
    except FileNotFoundError:
        return []
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            pst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if pst.st_ino == st.st_ino and pst.st_dev == st.st_dev:
            found.append(int(entry))
    return found
