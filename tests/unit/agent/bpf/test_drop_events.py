"""The drop stream's userspace half: record layout, decoding and the ring walk."""

from __future__ import annotations

import re
import struct
from ipaddress import IPv4Address, IPv6Address

from hypothesis import given
from hypothesis import strategies as st

from agent.bpf.codes import DropReason
from agent.bpf.events import EVENT_SIZE, DropEvent, DropProgram, decode_event, walk_records
from agent.bpf.maps import MAP_LAYOUTS
from agent.bpf.programs import DEFAULT_EBPF_DIR, DROP_EVENTS_BYTES, DataplaneOptions, build_cflags

HEADER = (DEFAULT_EBPF_DIR / "include" / "veil_events.h").read_text()
_EVENT = struct.Struct("=QIIBBBB2s2s16s16s")


def record(
    *,
    reason: int = DropReason.SPOOFED_SOURCE,
    family: int = 2,
    src: bytes = IPv4Address("10.0.0.9").packed,
    dst: bytes = IPv4Address("10.0.0.2").packed,
    sport: int = 40001,
    dport: int = 8080,
    program: int = DropProgram.POD_INGRESS,
    suppressed: int = 0,
) -> bytes:
    return _EVENT.pack(
        123, 7, suppressed, reason, family, 6, program, sport.to_bytes(2, "big"),
        dport.to_bytes(2, "big"), src.ljust(16, b"\0"), dst.ljust(16, b"\0"),
    )  # fmt: skip


def test_program_ids_and_record_size_match_the_header() -> None:
    for prog in DropProgram:
        if prog is DropProgram.UNKNOWN:
            continue
        m = re.search(rf"#define\s+VEIL_PROG_{prog.name}\s+(\d+)", HEADER)
        assert m and int(m.group(1)) == prog, prog
    body = re.search(r"struct veil_drop_event \{(.*?)\};", HEADER, re.S)
    assert body
    sizes = {"__u64": 8, "__u32": 4, "__be32": 4, "__be16": 2, "__u8": 1}
    total = 0
    for kind, count in re.findall(
        r"(__\w+)\s+\w+(?:\[(\d+)\])?;", re.sub(r"/\*.*?\*/", "", body.group(1))
    ):
        total += sizes[kind] * int(count or 1)
    assert total == EVENT_SIZE == 56  # no padding either side


def test_ring_layout_and_flags_agree() -> None:
    layout = MAP_LAYOUTS["drop_events"]
    assert layout.max_entries == DROP_EVENTS_BYTES
    assert DROP_EVENTS_BYTES & (DROP_EVENTS_BYTES - 1) == 0 and DROP_EVENTS_BYTES % 4096 == 0
    flags = build_cflags(DataplaneOptions(), DEFAULT_EBPF_DIR)
    assert f"-DVEIL_DROP_EVENTS_BYTES={DROP_EVENTS_BYTES}" in flags
    assert any(f.startswith("-DVEIL_DROP_EVENT_RATE=") for f in flags)


def test_decode_ipv4_record() -> None:
    e = decode_event(record(suppressed=3))
    assert e is not None
    assert (e.src, e.dst, e.sport, e.dport) == (
        IPv4Address("10.0.0.9"), IPv4Address("10.0.0.2"), 40001, 8080,
    )  # fmt: skip
    assert e.reason is DropReason.SPOOFED_SOURCE and e.program is DropProgram.POD_INGRESS
    assert e.suppressed == 3
    d = e.to_dict()
    assert d["src"] == "10.0.0.9:40001" and d["dst"] == "10.0.0.2:8080"
    assert (d["reason"], d["protocol"], d["family"], d["program"]) == (
        "spoofed_source", "tcp", "ipv4", "pod_ingress",
    )  # fmt: skip


def test_decode_ipv6_and_unknown_values() -> None:
    src, dst = IPv6Address("fd00::9"), IPv6Address("fd00::2")
    e = decode_event(record(family=10, src=src.packed, dst=dst.packed, reason=200, program=9))
    assert e is not None
    assert (e.src, e.dst) == (src, dst)
    assert e.to_dict()["src"] == "[fd00::9]:40001"
    assert e.reason == 200 and e.reason_label == "code_200" and e.program == 9
    unreadable = decode_event(record(family=0, sport=0, dport=0))
    assert unreadable is not None and unreadable.to_dict()["src"] == "?"
    assert decode_event(b"\0" * (EVENT_SIZE - 1)) is None


def test_wall_time_converts_from_the_monotonic_clock() -> None:
    e = DropEvent(5_000_000_000, 1, DropReason.NO_SOCKET, DropProgram.POD_EGRESS, 2, 6,
                  None, None, 0, 0)  # fmt: skip
    assert e.wall_time(now_wall=1000.0, now_mono_ns=7_000_000_000) == 998.0


def _ring(size: int, records: list[tuple[bytes, int]], start: int = 0) -> tuple[bytearray, int]:
    """A data area mapped twice (as the kernel maps it), holding records from ``start``."""
    area = bytearray(size)
    pos = start
    for sample, flags in records:
        total = (len(sample) + 8 + 7) & ~7
        blob = struct.pack("=II", len(sample) | flags, 0) + sample
        blob += b"\0" * (total - len(blob))
        for i, b in enumerate(blob):
            area[(pos + i) % size] = b
        pos += total
    return area + area, pos


def test_walk_reads_committed_skips_discarded_and_stops_at_busy() -> None:
    a, b, c = record(sport=1), record(sport=2), record(sport=3)
    data, end = _ring(4096, [(a, 0), (b, 1 << 30), (c, 0)])
    samples, pos = walk_records(data, 4095, 0, end)
    assert samples == [a, c] and pos == end
    data, end = _ring(4096, [(a, 0), (b, 1 << 31), (c, 0)])
    samples, pos = walk_records(data, 4095, 0, end)
    assert samples == [a] and pos == 64  # the busy record is read next time


def test_walk_handles_wrap_around_and_limits() -> None:
    size = 256
    recs = [(record(sport=i), 0) for i in range(3)]
    data, end = _ring(size, recs, start=size - 24)  # the first record straddles the end
    samples, pos = walk_records(data, size - 1, size - 24, end)
    assert [decode_event(s).sport for s in samples] == [0, 1, 2]  # type: ignore[union-attr]
    assert pos == end
    assert len(walk_records(data, size - 1, size - 24, end, limit=1)[0]) == 1


@given(st.binary(min_size=64, max_size=64), st.integers(0, 200))
def test_walk_never_crashes_on_garbage(raw: bytes, producer: int) -> None:
    samples, pos = walk_records(raw + raw, 63, 0, producer)
    assert pos >= 0 and all(len(s) <= 64 for s in samples)
