"""Preflight on this machine, and what a user sees when something is missing or broken."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bpf.programs import DEFAULT_EBPF_DIR, PROBE, PROGRAMS, load_single
from agent.errors import BpfError
from agent.preflight import run_preflight


def test_this_machine_passes_every_check() -> None:
    report = run_preflight(Path("/sys/fs/bpf/veil"))
    assert report.ok, report.problems
    assert [c.name for c in report.checks] == [
        "privileges",
        "bcc",
        "kernel headers",
        "bpffs",
        "bpf_sk_assign",
    ]


def test_missing_headers_name_the_fix_and_skip_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/nonexistent/kernel")
    report = run_preflight(Path("/sys/fs/bpf/veil"))
    assert not report.ok
    headers = next(c for c in report.checks if c.name == "kernel headers")
    assert not headers.ok and headers.fix
    probe = next(c for c in report.checks if c.name == "bpf_sk_assign")
    assert probe.skipped
    assert len(report.problems) == 1  # the skipped probe is not a second problem


def test_a_compile_error_carries_the_compiler_message() -> None:
    # A data-plane program built without its -D flags stops at veil_config.h's #error.
    spec = PROGRAMS[0]
    include = f"-I{DEFAULT_EBPF_DIR / 'include'}"
    with pytest.raises(BpfError) as info:
        load_single(spec, DEFAULT_EBPF_DIR, (include,))
    assert "must be passed as -D flags" in info.value.message
    assert info.value.hint


def test_missing_headers_at_compile_time_give_the_exact_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/nonexistent/kernel")
    with pytest.raises(BpfError) as info:
        load_single(PROBE)
    assert "kernel headers" in info.value.message.lower()
    assert info.value.hint is not None and "/build" in info.value.hint
