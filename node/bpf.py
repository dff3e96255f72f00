"""The bpf(2) system call through ctypes: what node processes need outside bcc.

bcc 0.26's Python binding can neither pin nor open pinned objects; the CLI
must read pinned maps on nodes where no compiler (or kernel headers) is
available; and the ztunnel must not load bcc at all (bcc and LLVM cost about
130 MB of RSS), yet fills the pinned same-node splice maps. So map and pin
access goes straight to the kernel here, shared by the agent and the ztunnel.
Only commands with stable layouts since Linux 4.x are used; every attribute
struct below is a prefix of ``union bpf_attr`` and the kernel zero-extends it.

Errors come back as :class:`BpfSyscallError` (an OSError carrying errno) so
callers can tell "no such entry" from real failures; agent.bpf.maps,
agent.bpf.pins and ztunnel.proxy.splice translate them into their own
errors with hints.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

__all__ = [
    "BPF_ANY",
    "BPF_MAP_TYPE_ARRAY",
    "BPF_MAP_TYPE_HASH",
    "BPF_MAP_TYPE_PERCPU_HASH",
    "BPF_MAP_TYPE_SOCKHASH",
    "BPF_NOEXIST",
    "SPLICE_MAPS",
    "SPLICE_MAX",
    "SPLICE_PEER_FORMAT",
    "SPLICE_PROGRAM",
    "BpfSyscallError",
    "MapInfo",
    "ProgInfo",
    "count_cpu_list",
    "map_delete",
    "map_info",
    "map_lookup",
    "map_next_key",
    "map_update",
    "obj_get",
    "obj_pin",
    "possible_cpus",
    "prog_info",
]

_SYSCALL_NR: Final = {"x86_64": 321, "aarch64": 280}

_BPF_MAP_LOOKUP_ELEM: Final = 1
_BPF_MAP_UPDATE_ELEM: Final = 2
_BPF_MAP_DELETE_ELEM: Final = 3
_BPF_MAP_GET_NEXT_KEY: Final = 4
_BPF_OBJ_PIN: Final = 6
_BPF_OBJ_GET: Final = 7
_BPF_OBJ_GET_INFO_BY_FD: Final = 15

BPF_ANY: Final = 0
BPF_NOEXIST: Final = 1

BPF_MAP_TYPE_HASH: Final = 1
BPF_MAP_TYPE_ARRAY: Final = 2
BPF_MAP_TYPE_PERCPU_HASH: Final = 5
BPF_MAP_TYPE_SOCKHASH: Final = 18

# The same-node splice (ebpf/sockmap.bpf.c, ebpf/include/veil_splice.h): the
# agent pins these under its pin directory, the ztunnel fills them. Kept here
# because both need them and neither may import the other.
SPLICE_MAX: Final = 65536  # spliced sockets per node (two per connection)
SPLICE_MAPS: Final = ("splice_socks", "splice_targets", "splice_peers")
SPLICE_PROGRAM: Final = "splice_verdict"  # pinned as prog_splice_verdict
# struct veil_splice_peer: peer cookie, bytes redirected (host order u64s).
SPLICE_PEER_FORMAT: Final = "=QQ"


class BpfSyscallError(OSError):
    """bpf(2) failed; ``errno`` says why."""


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # next_key for BPF_MAP_GET_NEXT_KEY
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about a map (BPF_OBJ_GET_INFO_BY_FD)."""

    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    """What the kernel says about a program, including the maps it uses."""

    id: int
    type: int
    tag: str
    name: str
    map_ids: tuple[int, ...]


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise BpfSyscallError(errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    rc: int = _libc().syscall(
        ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr))
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise BpfSyscallError(err, os.strerror(err))
    return rc


def obj_pin(fd: int, path: str) -> None:
    """Pin a map or program fd at ``path`` (which must not exist) on a bpffs."""
    raw = path.encode()
    buf = ctypes.create_string_buffer(raw)
    _bpf(_BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(buf), bpf_fd=fd))


def obj_get(path: str) -> int:
    """Open a pinned object; the caller owns (and closes) the returned fd."""
    buf = ctypes.create_string_buffer(path.encode())
    return _bpf(_BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(buf)))


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _bpf(
        _BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
    )
    return MapInfo(
        id=info.id,
        type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        name=info.name.decode(errors="replace"),
    )


def prog_info(fd: int) -> ProgInfo:
    # First call learns how many maps the program uses, second fetches their ids.
    info = _ProgInfo()
    _bpf(
        _BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
    )
    count = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    info2 = _ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
    _bpf(
        _BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info2), info=ctypes.addressof(info2)),
    )
    return ProgInfo(
        id=info.id,
        type=info.type,
        tag=bytes(info.tag).hex(),
        name=info.name.decode(errors="replace"),
        map_ids=tuple(ids[i] for i in range(min(count, info2.nr_map_ids))),
    )


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under ``key``, or None when there is none."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    try:
        _bpf(
            _BPF_MAP_LOOKUP_ELEM,
            _ElemAttr(map_fd=fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf)),
        )
    except BpfSyscallError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return vbuf.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _bpf(
        _BPF_MAP_UPDATE_ELEM,
        _ElemAttr(map_fd=fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf), flags=flags),
    )


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False when it was not there."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(_BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(kbuf)))
    except BpfSyscallError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after ``key`` (the first key when None); None at the end."""
    nbuf = ctypes.create_string_buffer(key_size)
    attr = _ElemAttr(map_fd=fd, value=ctypes.addressof(nbuf))
    kbuf = None
    if key is not None:
        kbuf = ctypes.create_string_buffer(key, len(key))
        attr.key = ctypes.addressof(kbuf)
    try:
        _bpf(_BPF_MAP_GET_NEXT_KEY, attr)
    except BpfSyscallError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return nbuf.raw


def possible_cpus() -> int:
    """Number of possible CPUs: the per-CPU value count the kernel copies out."""
    return count_cpu_list(Path("/sys/devices/system/cpu/possible").read_text())


def count_cpu_list(text: str) -> int:
    """Count the CPUs of a kernel cpu list such as ``0-3,8``."""
    total = 0
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        total += (int(hi) - int(lo) + 1) if hi else 1
    return total
