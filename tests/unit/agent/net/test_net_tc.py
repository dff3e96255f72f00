"""Decoding bpf filter attributes that pyroute2 leaves raw."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from agent.net.tc import TC_HANDLE, Hook, TcFilter, parse_bpf_options

# TCA_OPTIONS of `tc filter show` for a Veil filter, as the kernel sent it.
CAPTURED = bytes.fromhex(
    "40000200150007007665696c5f706f645f696e67726573730000000008000b00820000000c000a00"
    "4a2cd6c893be879008000800010000000800090008000000"
)


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def test_captured_kernel_message() -> None:
    assert parse_bpf_options(CAPTURED) == ("veil_pod_ingress", 0x82)


def test_attribute_order_does_not_matter() -> None:
    body = _nla(11, struct.pack("=I", 77)) + _nla(9, b"\x08\0\0\0") + _nla(7, b"veil_x\0")
    raw = struct.pack("=HH", 4 + len(body), 2) + body
    assert parse_bpf_options(raw) == ("veil_x", 77)


def test_missing_attributes() -> None:
    assert parse_bpf_options(struct.pack("=HH", 4, 2)) == ("", None)


@given(st.binary(max_size=256))
def test_never_crashes_on_garbage(raw: bytes) -> None:
    name, prog_id = parse_bpf_options(raw)
    assert isinstance(name, str)
    assert prog_id is None or 0 <= prog_id < 2**32


def test_ours_requires_name_and_handle() -> None:
    assert TcFilter(1, Hook.INGRESS, "veil_pod_ingress", 5, 1, TC_HANDLE).ours
    assert not TcFilter(1, Hook.INGRESS, "cilium", 5, 1, TC_HANDLE).ours
    assert not TcFilter(1, Hook.INGRESS, "veil_pod_ingress", 5, 1, 1).ours
