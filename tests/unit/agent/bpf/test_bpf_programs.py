"""Flags, compile unit and build id: pure functions of the sources and options."""

from __future__ import annotations

import re
from ipaddress import IPv6Address
from pathlib import Path

from agent.bpf.programs import (
    DEFAULT_EBPF_DIR,
    DNS_PORT,
    MAX_PODS,
    PROBE,
    PROGRAMS,
    DataplaneOptions,
    build_cflags,
    compile_unit,
)
from agent.net.tc import Hook
from node import dataplane as dp

PIN = Path("/sys/fs/bpf/veil")


def _defines(flags: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for flag in flags:
        if flag.startswith("-D"):
            name, _, value = flag[2:].partition("=")
            out[name] = value
    return out


def test_cflags_carry_the_shared_constants() -> None:
    defines = _defines(build_cflags(DataplaneOptions(), PIN))
    assert int(defines["VEIL_OUTBOUND_PORT"]) == dp.OUTBOUND_PORT
    assert int(defines["VEIL_INBOUND_PLAINTEXT_PORT"]) == dp.INBOUND_PLAINTEXT_PORT
    assert int(defines["VEIL_HBONE_PORT"]) == dp.HBONE_PORT
    assert int(defines["VEIL_MARK_MASK"], 0) == dp.MARK_MASK
    assert int(defines["VEIL_MARK_REDIRECT"], 0) == dp.MARK_REDIRECT
    assert int(defines["VEIL_MARK_ZTUNNEL"], 0) == dp.MARK_ZTUNNEL
    assert int(defines["VEIL_DNS_PORT"]) == DNS_PORT
    assert int(defines["VEIL_MAX_PODS"]) == MAX_PODS
    assert defines["VEIL_PIN_DIR"] == f'"{PIN}"'
    assert "VEIL_DROP_UDP" not in defines


def test_drop_udp_is_a_flag_not_a_text_edit() -> None:
    plain = build_cflags(DataplaneOptions(), PIN)
    strict = build_cflags(DataplaneOptions(drop_udp=True), PIN)
    assert set(strict) - set(plain) == {"-DVEIL_DROP_UDP=1"}
    assert (
        compile_unit(DataplaneOptions(), PIN).text
        == compile_unit(DataplaneOptions(drop_udp=True), PIN).text
    )


def test_icmp_echo_is_denied_by_default_and_allowed_by_a_flag() -> None:
    plain = build_cflags(DataplaneOptions(), PIN)
    assert "VEIL_ALLOW_ICMP_ECHO" not in _defines(plain)
    allowed = build_cflags(DataplaneOptions(allow_icmp_echo=True), PIN)
    assert set(allowed) - set(plain) == {"-DVEIL_ALLOW_ICMP_ECHO=1"}
    assert (
        compile_unit(DataplaneOptions(), PIN).build_id
        != compile_unit(DataplaneOptions(allow_icmp_echo=True), PIN).build_id
    )


def test_flags_define_every_macro_the_config_header_requires() -> None:
    text = (DEFAULT_EBPF_DIR / "include" / "veil_config.h").read_text()
    required = set(re.findall(r"!defined\((VEIL_\w+)\)", text))
    assert required
    assert required <= set(_defines(build_cflags(DataplaneOptions(), PIN)))


def test_marks_fit_the_mask_and_differ() -> None:
    assert dp.MARK_REDIRECT & ~dp.MARK_MASK == 0
    assert dp.MARK_ZTUNNEL & ~dp.MARK_MASK == 0
    assert dp.MARK_REDIRECT != dp.MARK_ZTUNNEL


def test_build_id_is_stable_and_tracks_flags_and_pin_dir() -> None:
    a = compile_unit(DataplaneOptions(), PIN)
    assert a.build_id == compile_unit(DataplaneOptions(), PIN).build_id
    assert len(bytes.fromhex(a.build_id)) == 32
    assert a.build_id != compile_unit(DataplaneOptions(drop_udp=True), PIN).build_id
    assert a.build_id != compile_unit(DataplaneOptions(), PIN / "node-b").build_id


def test_unit_is_every_program_file_in_order_with_line_markers() -> None:
    unit = compile_unit(DataplaneOptions(), PIN)
    positions = []
    for spec in PROGRAMS:
        path = DEFAULT_EBPF_DIR / spec.file
        marker = f'#line 1 "{path}"\n'
        assert marker + path.read_text() in unit.text
        positions.append(unit.text.index(marker))
    assert positions == sorted(positions)
    rendered = unit.render()
    assert unit.build_id in rendered
    assert all(flag in rendered for flag in unit.cflags)
    assert {h.path.name for h in unit.headers} >= {"veil_codes.h", "veil_maps.h", "veil_steer.h"}


def test_each_entry_function_lives_in_its_own_file() -> None:
    for spec in (*PROGRAMS, PROBE):
        text = (DEFAULT_EBPF_DIR / spec.file).read_text()
        assert re.search(rf"^int {spec.function}\(struct __sk_buff \*skb\)$", text, re.M)
        assert spec.file.endswith(".bpf.c")
    assert {s.hook for s in PROGRAMS} == {Hook.INGRESS, Hook.EGRESS}
    assert len({s.filter_name for s in PROGRAMS}) == len(PROGRAMS)
    assert all(s.filter_name.startswith("veil_") for s in PROGRAMS)


def test_headers_never_call_map_methods() -> None:
    # bcc rewrites map.lookup() only in the main file; in a header it compiles
    # to an indirect call the verifier rejects.
    for header in (DEFAULT_EBPF_DIR / "include").glob("*.h"):
        code = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
        assert not re.search(r"\.\s*(lookup|update|delete|lookup_or_try_init)\s*\(", code), header


def test_ipv6_probe_source_is_four_words_and_changes_the_build() -> None:
    plain = build_cflags(DataplaneOptions(), PIN)
    assert "VEIL_PROBE_SOURCE6" not in _defines(plain)
    opts = DataplaneOptions(probe_source6=IPv6Address("fd00:1:2:3::a"))
    defines = _defines(build_cflags(opts, PIN))
    assert defines["VEIL_PROBE_SOURCE6"] == "1"
    words = [defines[f"VEIL_PROBE_SOURCE6_W{i}"] for i in range(4)]
    assert words == ["0xfd000001U", "0x00020003U", "0x00000000U", "0x0000000aU"]
    assert compile_unit(DataplaneOptions(), PIN).build_id != compile_unit(opts, PIN).build_id
    text = (DEFAULT_EBPF_DIR / "include" / "veil_config.h").read_text()
    assert set(re.findall(r"defined\((VEIL_PROBE_SOURCE6_\w+)\)", text)) <= set(defines)
