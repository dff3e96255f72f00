"""Unix sockets at well-known paths that a newer instance can take over.

A DaemonSet rolling update with ``maxSurge`` runs the old and the new pod of
a node side by side, sharing host paths. A node process that serves on a unix
socket at such a path (the agent's ``/run/veil/agent.sock``) must let its
successor in without a gap and without either one deleting the other's
socket:

- :func:`bind_over` binds and listens at a temporary name beside the path,
  sets the mode, then ``rename(2)``\\s it over the path. The rename is atomic:
  a client connecting at any moment reaches either the old listener or the
  new one, never nothing. The old listener keeps its accepted connections,
  but the path no longer leads to it.
- :class:`SocketClaim` remembers which inode this process put at the path, so
  it can tell that it has been taken over (:meth:`SocketClaim.held`) and
  removes the path at exit only while the path is still its own
  (:meth:`SocketClaim.release`).
- :func:`socket_owner_pid` says which process listens at a path (for the
  "took over from pid N" log line), through ``SO_PEERCRED``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SocketClaim", "bind_over", "socket_owner_pid"]

# struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_UCRED = struct.Struct("iII")


@dataclass(frozen=True, slots=True)
class SocketClaim:
    """The inode this process bound at ``path``."""

    path: Path
    device: int
    inode: int

    def held(self) -> bool:
        """True while ``path`` still names this process's socket."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.device, self.inode)

    def release(self) -> bool:
        """Unlinks ``path`` if it is still ours; returns whether it did.

        A successor that renamed its socket over the path between the check
        and the unlink would lose its path; that window is a few system calls
        wide, and a successor re-checks its claim (see :meth:`held`) and binds
        again if it finds the path gone.
        """
        if not self.held():
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return True


def bind_over(
    path: Path, *, mode: int = 0o600, backlog: int = 128
) -> tuple[socket.socket, SocketClaim]:
    """A listening unix socket that has atomically replaced whatever was at ``path``.

    The parent directory is created (0700) when missing. The socket gets
    ``mode`` before it becomes reachable at ``path``, so it is never visible
    with looser permissions. Raises OSError with the path in the message.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Random, not the pid: two pods' processes may both be pid 1 in their
    # own PID namespaces while sharing this host directory.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, mode)
        sock.listen(backlog)
        st = os.lstat(tmp)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    sock.setblocking(False)
    return sock, SocketClaim(path, st.st_dev, st.st_ino)


def socket_owner_pid(path: Path, timeout: float = 1.0) -> int | None:
    """The pid listening at ``path``, or None when nothing answers there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, _uid, _gid = _UCRED.unpack(raw)
    return pid if pid > 0 else None
