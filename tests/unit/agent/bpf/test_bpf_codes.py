"""DropReason and PodFlag mirror ebpf/include/veil_codes.h exactly."""

from __future__ import annotations

import re

from agent.bpf.codes import DROP_SLOTS, DropReason, PodFlag
from agent.bpf.programs import DEFAULT_EBPF_DIR

HEADER = DEFAULT_EBPF_DIR / "include" / "veil_codes.h"


def _c_enum(text: str, name: str) -> dict[str, int]:
    body = re.search(r"enum\s+" + name + r"\s*\{(.*?)\};", text, re.S)
    assert body, f"enum {name} not found in {HEADER}"
    values: dict[str, int] = {}
    for match in re.finditer(
        r"^\s*(VEIL_DROP_\w+)\s*(?:=\s*(\d+))?\s*(?:,|$|/\*)", body.group(1), re.M
    ):
        ident, value = match.group(1), match.group(2)
        values[ident] = int(value) if value is not None else max(values.values()) + 1
    return values


def _c_define(text: str, name: str) -> int:
    match = re.search(r"#define\s+" + name + r"\s+(0x[0-9a-fA-F]+|\d+)", text)
    assert match, f"#define {name} not found"
    return int(match.group(1), 0)


def test_drop_reasons_mirror_the_header() -> None:
    text = HEADER.read_text()
    c_values = _c_enum(text, "veil_drop_reason")
    c_max = c_values.pop("VEIL_DROP__MAX")
    py_values = {f"VEIL_DROP_{r.name}": int(r) for r in DropReason}
    assert py_values == c_values
    assert c_max == max(py_values.values()) + 1


def test_slots_and_flags_mirror_the_header() -> None:
    text = HEADER.read_text()
    assert _c_define(text, "VEIL_DROP_SLOTS") == DROP_SLOTS
    assert _c_define(text, "VEIL_POD_ENROLLED") == PodFlag.ENROLLED
    assert max(DropReason) < DROP_SLOTS


def test_every_reason_is_described_with_a_stable_label() -> None:
    for reason in DropReason:
        assert reason.description
        assert reason.label == reason.name.lower()
