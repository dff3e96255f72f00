"""Typed access to Veil's pinned BPF maps: the ONE module that reads or writes them.

Maps are opened from their pins with bpf(2) (node.bpf), not through
a bcc module, so this works in any process on the node (the agent, the CLI)
without compiling anything. Values are packed with :mod:`struct` in the
exact layout of ebpf/include/veil_maps.h; :meth:`DataplaneMaps.open` compares
each pin's type, key and value size and capacity with these layouts and
refuses a mismatch rather than misreading it.

Everything returned is a frozen dataclass; addresses are IPv4Address or
IPv6Address. A pod's IPv4 address is in ``pods``; every source address it
may use (IPv4 and IPv6) is in ``pod_addrs``, keyed by (ifindex, family,
address); enrolled addresses map back to the pod's veth in ``local_ips``
(IPv4) and ``local_ips6`` (IPv6).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any, Final

from agent.bpf.codes import DROP_SLOTS, DropReason, PodFlag
from agent.bpf.pins import MAP_NAMES, PinLayout, open_pin
from agent.bpf.programs import DROP_EVENTS_BYTES, MAX_POD_ADDRS, MAX_PODS
from agent.errors import MapError
from node import bpf as syscall

__all__ = [
    "MAP_LAYOUTS",
    "DataplaneMaps",
    "LocalPodEntry",
    "MapLayout",
    "MapsDump",
    "NodeConfig",
    "PodAddrEntry",
    "PodCounters",
    "PodEntry",
    "check_layout",
    "decode_counters",
    "encode_counters",
]

_U32 = struct.Struct("=I")
_POD = struct.Struct("=4sI")  # struct veil_pod: __be32 ip, __u32 flags
_LOCAL = struct.Struct("=II")  # struct veil_local_pod: __u32 ifindex, __u32 flags
_COUNTERS = struct.Struct(f"=3Q{DROP_SLOTS}Q")  # struct veil_counters
_CONFIG = struct.Struct("=4sI32s")  # struct veil_config
# struct veil_pod_addr_key: __u32 ifindex, __u8 family, __u8 pad[3], __be32 addr[4]
_ADDR_KEY = struct.Struct("=IB3x16s")
_AF_INET = 2
_AF_INET6 = 10
# Map types node.bpf does not name (include/uapi/linux/bpf.h).
_BPF_MAP_TYPE_PERCPU_ARRAY = 6
_BPF_MAP_TYPE_RINGBUF = 27
_DROP_BUCKET_SIZE = 24  # struct veil_drop_bucket: three __u64
# The drop stream's maps: nothing here reads them (agent.bpf.events does).
_STREAM_MAPS = frozenset({"drop_events", "drop_limit"})

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class MapLayout:
    """The kernel-visible shape a pinned map must have."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int


MAP_LAYOUTS: Final[Mapping[str, MapLayout]] = {
    "pods": MapLayout("pods", syscall.BPF_MAP_TYPE_HASH, 4, _POD.size, MAX_PODS),
    "local_ips": MapLayout("local_ips", syscall.BPF_MAP_TYPE_HASH, 4, _LOCAL.size, MAX_PODS),
    "counters": MapLayout(
        "counters", syscall.BPF_MAP_TYPE_PERCPU_HASH, 4, _COUNTERS.size, MAX_PODS
    ),
    "config": MapLayout("config", syscall.BPF_MAP_TYPE_ARRAY, 4, _CONFIG.size, 1),
    "pod_addrs": MapLayout(
        "pod_addrs", syscall.BPF_MAP_TYPE_HASH, _ADDR_KEY.size, _U32.size, MAX_POD_ADDRS
    ),
    "local_ips6": MapLayout(
        "local_ips6", syscall.BPF_MAP_TYPE_HASH, 16, _LOCAL.size, MAX_POD_ADDRS
    ),
    # The drop stream (read by agent.bpf.events, never through this class).
    "drop_events": MapLayout("drop_events", _BPF_MAP_TYPE_RINGBUF, 0, 0, DROP_EVENTS_BYTES),
    "drop_limit": MapLayout("drop_limit", _BPF_MAP_TYPE_PERCPU_ARRAY, 4, _DROP_BUCKET_SIZE, 1),
}
assert tuple(MAP_LAYOUTS) == MAP_NAMES


@dataclass(frozen=True)
class PodEntry:
    """pods map: a pod behind host-side veth ``ifindex``."""

    ifindex: int
    ip: IPv4Address
    flags: PodFlag

    @property
    def enrolled(self) -> bool:
        return bool(self.flags & PodFlag.ENROLLED)


@dataclass(frozen=True)
class PodAddrEntry:
    """pod_addrs map: a source address the pod behind ``ifindex`` may use."""

    ifindex: int
    ip: IPAddress
    flags: int = 0


@dataclass(frozen=True)
class LocalPodEntry:
    """local_ips / local_ips6 maps: an enrolled local pod address and its veth."""

    ip: IPAddress
    ifindex: int
    flags: int = 0


@dataclass(frozen=True)
class PodCounters:
    """One pod's counters, summed over CPUs."""

    outbound_redirected: int = 0
    inbound_redirected: int = 0
    established: int = 0
    drops: Mapping[DropReason, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    def drop_count(self, reason: DropReason) -> int:
        return self.drops.get(reason, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "outbound_redirected": self.outbound_redirected,
            "inbound_redirected": self.inbound_redirected,
            "established": self.established,
            "drops": {r.label: n for r, n in sorted(self.drops.items()) if n},
        }


@dataclass(frozen=True)
class NodeConfig:
    """The single config slot: runtime settings the programs read."""

    probe_source: IPv4Address | None = None
    uplink_ifindex: int = 0
    build_id: str = ""


@dataclass(frozen=True)
class MapsDump:
    """Every entry of every Veil map, for `veilctl bpf maps`."""

    pods: tuple[PodEntry, ...]
    local_ips: tuple[LocalPodEntry, ...]
    counters: Mapping[int, PodCounters]
    config: NodeConfig
    pod_addrs: tuple[PodAddrEntry, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "pods": [
                {
                    "ifindex": p.ifindex,
                    "ip": str(p.ip),
                    "enrolled": p.enrolled,
                    "flags": int(p.flags),
                }
                for p in self.pods
            ],
            "local_ips": [
                {"ip": str(e.ip), "ifindex": e.ifindex, "flags": e.flags} for e in self.local_ips
            ],
            "pod_addrs": [
                {"ifindex": a.ifindex, "ip": str(a.ip), "family": a.ip.version}
                for a in self.pod_addrs
            ],
            "counters": {str(k): v.to_dict() for k, v in sorted(self.counters.items())},
            "config": {
                "probe_source": str(self.config.probe_source) if self.config.probe_source else None,
                "uplink_ifindex": self.config.uplink_ifindex,
                "build_id": self.config.build_id,
            },
        }


def _ip_bytes(ip: IPAddress) -> bytes:
    return ip.packed  # network order, as the programs compare it with the packet


def _addr_key(ifindex: int, ip: IPAddress) -> bytes:
    family = _AF_INET6 if ip.version == 6 else _AF_INET
    return _ADDR_KEY.pack(ifindex, family, ip.packed.ljust(16, b"\0"))


def _addr_from_key(key: bytes) -> PodAddrEntry:
    ifindex, family, raw = _ADDR_KEY.unpack(key)
    ip: IPAddress = IPv6Address(raw) if family == _AF_INET6 else IPv4Address(raw[:4])
    return PodAddrEntry(ifindex, ip)


def _local_map(ip: IPAddress) -> str:
    return "local_ips6" if ip.version == 6 else "local_ips"


class DataplaneMaps:
    """Open fds on the pinned maps. Thread-safe as far as the kernel is (it is)."""

    def __init__(self, layout: PinLayout, fds: Mapping[str, int]) -> None:
        self.layout = layout
        self._fds = dict(fds)
        self._ncpus = syscall.possible_cpus()

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, layout: PinLayout) -> DataplaneMaps:
        """Open every map pin; MapError if one is missing or has the wrong shape."""
        fds: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                fd = open_pin(layout.map(name))
                if fd is None and name in _STREAM_MAPS:
                    continue  # pins of an agent that predates the drop stream: still readable
                if fd is None:
                    raise MapError(
                        f"BPF map {name} is not pinned at {layout.map(name)}",
                        hint="start the agent (it loads the programs and pins the maps), "
                        "or pass the node's --pin-dir",
                    )
                fds[name] = fd
                check_layout(name, syscall.map_info(fd), layout.map(name))
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(layout, fds)

    def map_ids(self) -> frozenset[int]:
        return frozenset(syscall.map_info(fd).id for fd in self._fds.values())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, name: str) -> int:
        try:
            return self._fds[name]
        except KeyError:
            raise MapError(f"map {name} is closed", hint="open the Dataplane again") from None

    # -- pods ------------------------------------------------------------------

    def pod(self, ifindex: int) -> PodEntry | None:
        raw = self._lookup("pods", _U32.pack(ifindex), _POD.size)
        return None if raw is None else _pod_entry(ifindex, raw)

    def pods(self) -> list[PodEntry]:
        out = []
        for key in self._keys("pods"):
            raw = self._lookup("pods", key, _POD.size)
            if raw is not None:
                out.append(_pod_entry(_U32.unpack(key)[0], raw))
        return sorted(out, key=lambda p: p.ifindex)

    def put_pod(self, entry: PodEntry) -> None:
        self._update("pods", _U32.pack(entry.ifindex), _POD.pack(_ip_bytes(entry.ip), entry.flags))

    def delete_pod(self, ifindex: int) -> bool:
        return self._delete("pods", _U32.pack(ifindex))

    # -- local_ips ---------------------------------------------------------------

    def local_ip(self, ip: IPAddress) -> LocalPodEntry | None:
        raw = self._lookup(_local_map(ip), _ip_bytes(ip), _LOCAL.size)
        if raw is None:
            return None
        ifindex, flags = _LOCAL.unpack(raw)
        return LocalPodEntry(ip, ifindex, flags)

    def local_ips(self) -> list[LocalPodEntry]:
        """Both families: IPv4 entries first, then IPv6."""
        out: list[LocalPodEntry] = []
        for name, make in (("local_ips", IPv4Address), ("local_ips6", IPv6Address)):
            found = []
            for key in self._keys(name):
                raw = self._lookup(name, key, _LOCAL.size)
                if raw is not None:
                    ifindex, flags = _LOCAL.unpack(raw)
                    found.append(LocalPodEntry(make(key), ifindex, flags))
            out += sorted(found, key=lambda e: e.ip.packed)
        return out

    def put_local_ip(self, entry: LocalPodEntry) -> None:
        self._update(
            _local_map(entry.ip), _ip_bytes(entry.ip), _LOCAL.pack(entry.ifindex, entry.flags)
        )

    def delete_local_ip(self, ip: IPAddress) -> bool:
        return self._delete(_local_map(ip), _ip_bytes(ip))

    # -- pod_addrs ---------------------------------------------------------------

    def pod_addrs(self, ifindex: int | None = None) -> list[PodAddrEntry]:
        """Every allowed source address (of one veth, or of all), IPv4 before IPv6."""
        out = []
        for key in self._keys("pod_addrs"):
            entry = _addr_from_key(key)
            if ifindex is not None and entry.ifindex != ifindex:
                continue
            raw = self._lookup("pod_addrs", key, _U32.size)
            if raw is not None:
                out.append(PodAddrEntry(entry.ifindex, entry.ip, _U32.unpack(raw)[0]))
        return sorted(out, key=lambda a: (a.ifindex, a.ip.version, a.ip.packed))

    def put_pod_addr(self, entry: PodAddrEntry) -> None:
        self._update("pod_addrs", _addr_key(entry.ifindex, entry.ip), _U32.pack(entry.flags))

    def delete_pod_addr(self, ifindex: int, ip: IPAddress) -> bool:
        return self._delete("pod_addrs", _addr_key(ifindex, ip))

    # -- counters ----------------------------------------------------------------

    def counters(self, ifindex: int) -> PodCounters | None:
        raw = self._lookup("counters", _U32.pack(ifindex), _COUNTERS.size * self._ncpus)
        return None if raw is None else self._sum_counters(raw)

    def all_counters(self) -> dict[int, PodCounters]:
        out = {}
        for key in self._keys("counters"):
            raw = self._lookup("counters", key, _COUNTERS.size * self._ncpus)
            if raw is not None:
                out[_U32.unpack(key)[0]] = self._sum_counters(raw)
        return out

    def create_counters(self, ifindex: int) -> None:
        """Create a zero row for ``ifindex`` unless one exists (programs never create rows)."""
        zero = bytes(_COUNTERS.size * self._ncpus)
        try:
            syscall.map_update(self._fd("counters"), _U32.pack(ifindex), zero, syscall.BPF_NOEXIST)
        except syscall.BpfSyscallError as exc:
            if exc.errno != errno.EEXIST:
                raise _map_error("counters", "create a row in", exc) from exc

    def delete_counters(self, ifindex: int) -> bool:
        return self._delete("counters", _U32.pack(ifindex))

    def _sum_counters(self, raw: bytes) -> PodCounters:
        return decode_counters(raw, self._ncpus)

    # -- config ------------------------------------------------------------------

    def config(self) -> NodeConfig:
        raw = self._lookup("config", _U32.pack(0), _CONFIG.size)
        if raw is None:  # an array slot always exists; keep the type honest anyway
            return NodeConfig()
        probe, uplink, build = _CONFIG.unpack(raw)
        return NodeConfig(
            probe_source=None if probe == bytes(4) else IPv4Address(probe),
            uplink_ifindex=uplink,
            build_id=build.hex() if build != bytes(32) else "",
        )

    def put_config(self, config: NodeConfig) -> None:
        probe = _ip_bytes(config.probe_source) if config.probe_source else bytes(4)
        build = bytes.fromhex(config.build_id) if config.build_id else bytes(32)
        if len(build) != 32:
            raise MapError(f"build id {config.build_id!r} is not a sha256 hex digest")
        self._update("config", _U32.pack(0), _CONFIG.pack(probe, config.uplink_ifindex, build))

    # -- everything --------------------------------------------------------------

    def dump(self) -> MapsDump:
        return MapsDump(
            pods=tuple(self.pods()),
            local_ips=tuple(self.local_ips()),
            counters=self.all_counters(),
            config=self.config(),
            pod_addrs=tuple(self.pod_addrs()),
        )

    # -- plumbing ----------------------------------------------------------------

    def _keys(self, name: str) -> Iterator[bytes]:
        """All keys; bounded so a map mutated while we walk it cannot loop forever."""
        fd = self._fd(name)
        key_size = MAP_LAYOUTS[name].key_size
        key: bytes | None = None
        for _ in range(MAP_LAYOUTS[name].max_entries + 1):
            try:
                key = syscall.map_next_key(fd, key, key_size)
            except syscall.BpfSyscallError as exc:
                raise _map_error(name, "iterate", exc) from exc
            if key is None:
                return
            yield key

    def _lookup(self, name: str, key: bytes, size: int) -> bytes | None:
        try:
            return syscall.map_lookup(self._fd(name), key, size)
        except syscall.BpfSyscallError as exc:
            raise _map_error(name, "read", exc) from exc

    def _update(self, name: str, key: bytes, value: bytes) -> None:
        try:
            syscall.map_update(self._fd(name), key, value)
        except syscall.BpfSyscallError as exc:
            raise _map_error(name, "write", exc) from exc

    def _delete(self, name: str, key: bytes) -> bool:
        try:
            return syscall.map_delete(self._fd(name), key)
        except syscall.BpfSyscallError as exc:
            raise _map_error(name, "delete from", exc) from exc


def check_layout(name: str, info: syscall.MapInfo, path: Path) -> None:
    """MapError unless the pinned map has the layout this agent was built for."""
    want = MAP_LAYOUTS[name]
    got = (info.type, info.key_size, info.value_size, info.max_entries)
    expected = (want.type, want.key_size, want.value_size, want.max_entries)
    if got != expected:
        raise MapError(
            f"pinned map {path} has type/key/value/capacity {got}, this agent expects {expected}",
            hint="it was pinned by an incompatible agent version; run `veil agent uninstall` "
            "(redirection stops until the agent starts again) and start the agent",
        )


def decode_counters(raw: bytes, ncpus: int) -> PodCounters:
    """Sum one per-CPU counters value (``ncpus`` copies of struct veil_counters)."""
    totals = [0] * (3 + DROP_SLOTS)
    for cpu in range(ncpus):
        for i, value in enumerate(_COUNTERS.unpack_from(raw, cpu * _COUNTERS.size)):
            totals[i] += value
    known = {int(r) for r in DropReason}
    drops = {
        DropReason(slot): count
        for slot, count in enumerate(totals[3:])
        if count and slot in known and slot != DropReason.NONE
    }
    return PodCounters(totals[0], totals[1], totals[2], drops)


def encode_counters(values: Sequence[PodCounters]) -> bytes:
    """The per-CPU value holding one PodCounters per CPU (the inverse of decode_counters)."""
    out = bytearray()
    for c in values:
        slots = [0] * DROP_SLOTS
        for reason, count in c.drops.items():
            slots[reason] = count
        out += _COUNTERS.pack(c.outbound_redirected, c.inbound_redirected, c.established, *slots)
    return bytes(out)


def _pod_entry(ifindex: int, raw: bytes) -> PodEntry:
    ip, flags = _POD.unpack(raw)
    return PodEntry(ifindex, ipaddress.IPv4Address(ip), PodFlag(flags))


def _map_error(name: str, action: str, exc: OSError) -> MapError:
    hint = "the agent needs root (CAP_BPF)"
    if exc.errno == errno.E2BIG:
        size = MAP_LAYOUTS[name].max_entries if name in MAP_LAYOUTS else MAX_PODS
        hint = f"the map is full ({size} entries): remove pods that no longer exist"
    return MapError(f"cannot {action} BPF map {name}: {exc.strerror}", hint=hint)
