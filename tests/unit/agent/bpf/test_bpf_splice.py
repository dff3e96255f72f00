"""The splice's build id: what decides between reusing the pins and rebuilding."""

from __future__ import annotations

from agent.bpf.programs import DEFAULT_EBPF_DIR
from agent.bpf.splice import SPLICE_FILE, build_id, splice_cflags
from node import bpf


def test_build_id_names_source_and_flags() -> None:
    flags = splice_cflags(DEFAULT_EBPF_DIR)
    base = build_id("int x;", flags)
    assert len(base) == 16
    assert build_id("int x;", flags) == base
    assert build_id("int y;", flags) != base
    assert build_id("int x;", (*flags, "-DOTHER=1")) != base


def test_flags_carry_the_map_size_the_ztunnel_assumes() -> None:
    flags = splice_cflags(DEFAULT_EBPF_DIR)
    assert f"-DVEIL_SPLICE_MAX={bpf.SPLICE_MAX}" in flags
    assert (DEFAULT_EBPF_DIR / SPLICE_FILE).is_file()


def test_peer_value_layout_matches_the_c_struct() -> None:
    import struct

    header = (DEFAULT_EBPF_DIR / "include" / "veil_splice.h").read_text()
    assert "__u64 peer;" in header and "__u64 bytes;" in header
    assert struct.calcsize(bpf.SPLICE_PEER_FORMAT) == 16
