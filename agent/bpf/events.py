"""The drop stream: reads the pinned ``drop_events`` ring buffer into DropEvent values.

The BPF programs write one ``struct veil_drop_event`` (ebpf/include/veil_events.h)
per reported drop, rate limited per CPU. This module is the ONE reader of that
map. It opens the pin with bpf(2) and maps the ring with mmap(2), the way the
kernel's BPF ring buffer is meant to be consumed, so no bcc (and no LLVM in
the agent's memory) is needed and it works whether the agent compiled the
programs or reused the pinned ones.

Ring buffer layout (kernel ABI): page 0 holds the consumer position (written
by us); page 1 the producer position (kernel); then the data area of
``max_entries`` bytes, mapped twice in a row so a record that wraps around
the end reads as one contiguous slice. Each record is an 8-byte header
(``u32 len`` with BUSY and DISCARD bits, ``u32 page offset``) followed by
the sample, padded to 8 bytes; positions only grow and are masked into the
data area.

:func:`decode_event` and :func:`walk_records` are pure (unit tested with
bytes); :class:`DropEventReader` does the mapping.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from agent.bpf.codes import DropReason
from agent.bpf.maps import MAP_LAYOUTS, check_layout
from agent.bpf.pins import PinLayout, open_pin
from agent.errors import MapError
from node import bpf as syscall

__all__ = [
    "EVENT_SIZE",
    "DropEvent",
    "DropEventReader",
    "DropProgram",
    "decode_event",
    "walk_records",
]

# struct veil_drop_event: u64 ts, u32 ifindex, u32 suppressed, u8 reason, family,
# protocol, program, be16 sport, dport, be32 saddr[4], daddr[4].
_EVENT: Final = struct.Struct("=QIIBBBB2s2s16s16s")
EVENT_SIZE: Final = _EVENT.size
_U32: Final = struct.Struct("=I")
_U64: Final = struct.Struct("=Q")
_HDR_SIZE: Final = 8
_BUSY_BIT: Final = 1 << 31
_DISCARD_BIT: Final = 1 << 30
_AF_INET: Final = 2
_AF_INET6: Final = 10
_PROTOCOLS: Final = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
# Records handled per read() call: a reader never spins on a busy ring.
_MAX_BATCH: Final = 4096

IPAddress = IPv4Address | IPv6Address


class DropProgram(IntEnum):
    """Which program dropped (VEIL_PROG_* in veil_events.h)."""

    UNKNOWN = 0
    POD_INGRESS = 1
    UPLINK_INGRESS = 2
    POD_EGRESS = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class DropEvent:
    """One reported drop. ``suppressed``: records the rate limit swallowed before it."""

    monotonic_ns: int
    ifindex: int
    reason: DropReason | int
    program: DropProgram | int
    family: int
    protocol: int
    src: IPAddress | None
    dst: IPAddress | None
    sport: int
    dport: int
    suppressed: int = 0

    @property
    def reason_label(self) -> str:
        return self.reason.label if isinstance(self.reason, DropReason) else f"code_{self.reason}"

    @property
    def protocol_label(self) -> str:
        return _PROTOCOLS.get(self.protocol, str(self.protocol))

    def wall_time(self, now_wall: float | None = None, now_mono_ns: int | None = None) -> float:
        """Seconds since the epoch: bpf_ktime_get_ns() is CLOCK_MONOTONIC."""
        wall = time.time() if now_wall is None else now_wall
        mono = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        return wall - (mono - self.monotonic_ns) / 1e9

    def endpoint(self, ip: IPAddress | None, port: int) -> str:
        if ip is None:
            return "?"
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{host}:{port}" if port else host

    def to_dict(self) -> dict[str, Any]:
        program = self.program.label if isinstance(self.program, DropProgram) else self.program
        return {
            "ifindex": self.ifindex,
            "reason": self.reason_label,
            "reason_code": int(self.reason),
            "program": program,
            "family": {_AF_INET: "ipv4", _AF_INET6: "ipv6"}.get(self.family),
            "protocol": self.protocol_label,
            "src": self.endpoint(self.src, self.sport),
            "dst": self.endpoint(self.dst, self.dport),
            "src_ip": str(self.src) if self.src is not None else None,
            "dst_ip": str(self.dst) if self.dst is not None else None,
            "src_port": self.sport,
            "dst_port": self.dport,
        }


def decode_event(raw: bytes) -> DropEvent | None:
    """A record's sample as a DropEvent; None when it is too short to be one."""
    if len(raw) < EVENT_SIZE:
        return None
    ts, ifindex, suppressed, reason, family, proto, program, sport, dport, saddr, daddr = (
        _EVENT.unpack_from(raw)
    )
    src: IPAddress | None
    dst: IPAddress | None
    if family == _AF_INET6:
        src, dst = IPv6Address(saddr), IPv6Address(daddr)
    elif family == _AF_INET:
        src, dst = IPv4Address(saddr[:4]), IPv4Address(daddr[:4])
    else:
        src = dst = None
    try:
        why: DropReason | int = DropReason(reason)
    except ValueError:
        why = reason  # a newer program's reason: shown as its number, never a crash
    try:
        prog: DropProgram | int = DropProgram(program)
    except ValueError:
        prog = program
    return DropEvent(
        monotonic_ns=ts,
        ifindex=ifindex,
        reason=why,
        program=prog,
        family=family,
        protocol=proto,
        src=src,
        dst=dst,
        sport=int.from_bytes(sport, "big"),
        dport=int.from_bytes(dport, "big"),
        suppressed=suppressed,
    )


def walk_records(
    data: Any, mask: int, consumer: int, producer: int, limit: int = _MAX_BATCH
) -> tuple[list[bytes], int]:
    """Committed samples between the positions, and the new consumer position.

    ``data`` is the data area mapped twice (indexable bytes of length
    ``2 * (mask + 1)``). Stops at a record the kernel is still writing (BUSY),
    so that record is read next time; discarded records are skipped.
    """
    samples: list[bytes] = []
    pos = consumer
    while pos < producer and len(samples) < limit:
        off = pos & mask
        header = _U32.unpack_from(data, off)[0]
        if header & _BUSY_BIT:
            break
        length = header & ~(_BUSY_BIT | _DISCARD_BIT)
        if length > mask + 1:  # corrupt: resynchronise at the producer
            return samples, producer
        if not header & _DISCARD_BIT:
            start = off + _HDR_SIZE
            samples.append(bytes(data[start : start + length]))
        pos += (length + _HDR_SIZE + 7) & ~7
    return samples, pos


class DropEventReader:
    """The pinned ``drop_events`` ring buffer, mapped for reading.

    ``fileno()`` becomes readable (epoll) when records wait; :meth:`read`
    returns them. One reader per pin directory: the consumer position is
    shared by everyone who maps the ring.
    """

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(
            fd, page, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        try:
            self._producer = mmap.mmap(
                fd, page + 2 * size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=page
            )
        except BaseException:
            self._consumer.close()
            raise
        self._data = memoryview(self._producer)[page:]
        self.lost = 0  # records the rate limit swallowed, summed over what we read

    @classmethod
    def open(cls, layout: PinLayout) -> DropEventReader:
        """Map the pinned ring; MapError when it is missing or not the expected map."""
        path = layout.map("drop_events")
        try:
            fd = open_pin(path)
        except Exception as exc:
            raise MapError(f"cannot open the drop stream {path}: {exc}") from exc
        if fd is None:
            raise MapError(
                f"the drop stream is not pinned at {path}",
                hint="the programs there predate the drop stream: restart the agent to load them",
            )
        try:
            check_layout("drop_events", syscall.map_info(fd), path)
            return cls(fd, MAP_LAYOUTS["drop_events"].max_entries)
        except OSError as exc:
            os.close(fd)
            raise MapError(
                f"cannot map the drop stream {path}: {exc.strerror}",
                hint="the agent needs root (CAP_BPF) and a kernel with BPF ring buffers (5.8+)",
            ) from exc
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def pending(self) -> int:
        """Bytes written by the programs and not read yet."""
        return int(self._producer_pos() - self._consumer_pos())

    def _producer_pos(self) -> int:
        # An aligned 8-byte load; x86 and arm64 never tear it.
        return int(_U64.unpack_from(self._producer, 0)[0])

    def _consumer_pos(self) -> int:
        return int(_U64.unpack_from(self._consumer, 0)[0])

    def read(self, limit: int = _MAX_BATCH) -> list[DropEvent]:
        """Every committed record (up to ``limit``), consumed."""
        samples, pos = walk_records(
            self._data, self._size - 1, self._consumer_pos(), self._producer_pos(), limit
        )
        # Publish the new position only after the samples were copied out:
        # from then on the kernel may overwrite that space.
        _U64.pack_into(self._consumer, 0, pos)
        events = [e for e in map(decode_event, samples) if e is not None]
        self.lost += sum(e.suppressed for e in events)
        return events

    def skip(self) -> int:
        """Discard the backlog (records written while nobody read); returns how many."""
        skipped = 0
        for _ in range(64):
            batch = self.read()
            skipped += len(batch)
            if not batch:
                break
        return skipped

    def close(self) -> None:
        if self._fd < 0:
            return
        self._data.release()
        self._producer.close()
        self._consumer.close()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> DropEventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
