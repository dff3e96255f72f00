"""bpffs pins: where Veil's maps and programs live between agent processes.

Layout of a pin directory (default /sys/fs/bpf/veil; one per node when
several lab nodes share a machine, because bpffs is not per network
namespace)::

    pods  local_ips  counters  config  pod_addrs  local_ips6
    drop_events  drop_limit                       maps (BPF_TABLE_PINNED in ebpf/include)
    prog_pod_ingress  prog_uplink_ingress  prog_pod_egress     programs

Maps are pinned by bcc itself when the programs are compiled; programs are
pinned here after loading. A program pin is replaced atomically (pin under a
temporary name, then rename(2) over the old one, which bpffs supports), so a
concurrent reader always finds a complete program. bpffs refuses names
containing a dot, hence the ``_new`` suffix.

bpffs must be the HOST's instance: each mount of bpffs is a separate
filesystem, and a private mount (``ip netns exec`` remounts /sys, containers
have their own mount namespace) disappears with the process, taking the pins
with it. So the agent mounts bpffs itself only in the initial mount
namespace, and otherwise fails with a hint instead of pinning into a
throwaway instance.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import BpfError
from node import bpf as syscall

__all__ = [
    "BPFFS_ROOT",
    "DEFAULT_PIN_DIR",
    "MAP_NAMES",
    "PinLayout",
    "bpffs_mount_for",
    "ensure_bpffs",
    "in_initial_mount_namespace",
    "mount_bpffs",
    "open_pin",
    "pin_atomically",
    "validate_pin_dir",
]

BPFFS_ROOT: Final = Path("/sys/fs/bpf")
DEFAULT_PIN_DIR: Final = BPFFS_ROOT / "veil"
# A map added here is created and pinned by the next compile: older pins lack
# it, so Dataplane.open does not reuse their programs and swaps in a new build
# that keeps every older map (and its entries).
MAP_NAMES: Final = (
    "pods",
    "local_ips",
    "counters",
    "config",
    "pod_addrs",
    "local_ips6",
    "drop_events",
    "drop_limit",
)

# Path characters that survive the trip into a C string literal (-DVEIL_PIN_DIR)
# and bcc's "type:path" section syntax, which splits on ':'. bpffs forbids '.'.
_PIN_DIR_RE: Final = re.compile(r"^/[A-Za-z0-9_/-]+$")


@dataclass(frozen=True)
class PinLayout:
    """Paths of every pin under one pin directory."""

    root: Path

    def map(self, name: str) -> Path:
        return self.root / name

    def program(self, name: str) -> Path:
        return self.root / f"prog_{name}"

    def all_pins(self) -> list[Path]:
        """Every pin currently present in the directory (maps, programs, leftovers)."""
        try:
            return sorted(p for p in self.root.iterdir() if not p.is_dir())
        except FileNotFoundError:
            return []


def validate_pin_dir(pin_dir: Path) -> Path:
    """Check that ``pin_dir`` can be spelled in C and on bpffs; return it absolute."""
    text = str(pin_dir)
    if not _PIN_DIR_RE.match(text) or "//" in text or text.endswith("/"):
        raise BpfError(
            f"pin directory {text!r} is not usable",
            hint="use an absolute path of letters, digits, '_', '-' and '/', "
            "without dots, e.g. /sys/fs/bpf/veil or /sys/fs/bpf/veil/node-a",
        )
    return pin_dir


def bpffs_mount_for(path: Path, mountinfo: str) -> tuple[Path, str] | None:
    """The mount point covering ``path`` and its filesystem type, from /proc/self/mountinfo.

    The last matching line wins, as later mounts shadow earlier ones.
    """
    best: tuple[Path, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        fstype = right.split()[0]
        covers = path == mount_point or mount_point in path.parents
        if covers and (best is None or len(mount_point.parts) >= len(best[0].parts)):
            best = (mount_point, fstype)
    return best


def in_initial_mount_namespace() -> bool:
    """True when this process shares pid 1's mount namespace."""
    try:
        return os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/1/ns/mnt")
    except OSError:
        return False


def mount_bpffs(target: Path = BPFFS_ROOT) -> None:
    """``mount -t bpf bpf <target>`` (mode 0700)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    target.mkdir(parents=True, exist_ok=True)
    rc = libc.mount(b"bpf", str(target).encode(), b"bpf", 0, b"mode=0700")
    if rc != 0:
        err = ctypes.get_errno()
        raise BpfError(
            f"cannot mount bpffs at {target}: {os.strerror(err)}",
            hint=f"run as root (CAP_SYS_ADMIN), or mount it yourself: mount -t bpf bpf {target}",
        )


def ensure_bpffs(pin_dir: Path, *, allow_mount: bool = True) -> bool:
    """Make sure ``pin_dir`` lies on bpffs; mount /sys/fs/bpf if needed. True if mounted now."""
    validate_pin_dir(pin_dir)
    mountinfo = Path("/proc/self/mountinfo").read_text()
    found = bpffs_mount_for(pin_dir, mountinfo)
    if found is not None and found[1] == "bpf":
        return False
    if pin_dir != BPFFS_ROOT and BPFFS_ROOT not in pin_dir.parents:
        raise BpfError(
            f"pin directory {pin_dir} is not on a bpf filesystem",
            hint=f"mount one there first (mount -t bpf bpf <dir>) or use a path under {BPFFS_ROOT}",
        )
    if not allow_mount or not in_initial_mount_namespace():
        raise BpfError(
            f"no bpf filesystem at {BPFFS_ROOT} in this mount namespace",
            hint="pins made in a private mount would vanish with this process; give the agent "
            f"the host's {BPFFS_ROOT} (hostPath mount in Kubernetes; nsenter --net instead of "
            f"'ip netns exec', which remounts /sys), or run: mount -t bpf bpf {BPFFS_ROOT}",
        )
    mount_bpffs(BPFFS_ROOT)
    return True


def open_pin(path: Path) -> int | None:
    """Open a pinned map or program; None when nothing is pinned there."""
    if not path.exists():
        return None
    try:
        return syscall.obj_get(str(path))
    except syscall.BpfSyscallError as exc:
        raise BpfError(
            f"cannot open pinned object {path}: {exc.strerror}",
            hint="the agent needs root (CAP_BPF + CAP_SYS_ADMIN) to open pins",
        ) from exc


def pin_atomically(fd: int, path: Path) -> None:
    """Pin ``fd`` at ``path``, replacing whatever was pinned there in one rename(2)."""
    tmp = path.with_name(f"{path.name}_new")
    tmp.unlink(missing_ok=True)
    try:
        syscall.obj_pin(fd, str(tmp))
        os.rename(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BpfError(
            f"cannot pin {path}: {exc.strerror}",
            hint=f"check that {path.parent} is on bpffs and writable by root",
        ) from exc
