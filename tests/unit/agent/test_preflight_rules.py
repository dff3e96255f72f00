"""Preflight decisions that need no kernel: capabilities and the headers fix."""

from __future__ import annotations

import pytest

from agent.bpf.syscall import count_cpu_list
from agent.errors import PreflightError
from agent.preflight import (
    CAP_BPF,
    CAP_NET_ADMIN,
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    PreflightCheck,
    PreflightReport,
    headers_fix,
    missing_capabilities,
)


def caps(*bits: int) -> int:
    return sum(1 << b for b in bits)


@pytest.mark.parametrize(
    ("cap_eff", "euid", "missing"),
    [
        ((1 << 41) - 1, 0, []),
        (caps(CAP_NET_ADMIN, CAP_SYS_ADMIN), 1000, []),
        (caps(CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON), 1000, []),
        (caps(CAP_NET_ADMIN, CAP_BPF), 1000, ["CAP_PERFMON"]),
        (caps(CAP_BPF, CAP_PERFMON), 1000, ["CAP_NET_ADMIN"]),
        (0, 1000, ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"]),
        # Root without capabilities: the advice names what daemonset/node.yaml grants.
        (0, 0, ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"]),
    ],
)
def test_missing_capabilities(cap_eff: int, euid: int, missing: list[str]) -> None:
    assert missing_capabilities(cap_eff, euid) == missing


def test_headers_fix_links_the_installed_debian_headers() -> None:
    fix = headers_fix(
        "6.18.44-x",
        "x86_64",
        ["linux-headers-6.1.0-56-amd64", "linux-headers-6.1.0-56-common", "linux-kbuild-6.1"],
    )
    assert "apt-get" not in fix
    assert "ln -sfn /usr/src/linux-headers-6.1.0-56-amd64 /lib/modules/6.18.44-x/build" in fix
    assert "ln -sfn /usr/src/linux-headers-6.1.0-56-common /lib/modules/6.18.44-x/source" in fix


def test_headers_fix_installs_first_when_nothing_is_there() -> None:
    fix = headers_fix("6.18.44-x", "x86_64", [])
    assert fix.startswith("apt-get install linux-headers-amd64 && ")
    assert "/lib/modules/6.18.44-x/build" in fix
    assert headers_fix("6.1.0", "aarch64", []).startswith("apt-get install linux-headers-arm64")


def test_report_lists_each_problem_with_its_fix() -> None:
    report = PreflightReport(
        (
            PreflightCheck("bcc", True, "ok"),
            PreflightCheck("kernel headers", False, "none at /lib/modules/x/build", "apt-get x"),
            PreflightCheck("bpf_sk_assign", False, "skipped", skipped=True),
        )
    )
    assert not report.ok
    assert report.problems == ("kernel headers: none at /lib/modules/x/build -> fix: apt-get x",)
    with pytest.raises(PreflightError) as info:
        report.raise_for_problems()
    assert "apt-get x" in str(info.value)
    assert info.value.problems == report.problems


@pytest.mark.parametrize(("text", "n"), [("0", 1), ("0-1\n", 2), ("0-3,8", 5), ("0,2,4-5", 4)])
def test_cpu_list(text: str, n: int) -> None:
    assert count_cpu_list(text) == n


@pytest.mark.parametrize(
    ("running", "headers", "warns"),
    [
        ("6.18.0-1-amd64", "6.1.0-37-amd64", True),
        ("6.1.0-37-amd64", "6.1.0-30-amd64", False),
        ("6.1.0", None, False),
        ("weird", "6.1.0", False),
    ],
)
def test_headers_version_mismatch_warns(running: str, headers: str | None, warns: bool) -> None:
    from agent.preflight import headers_mismatch

    warning = headers_mismatch(running, headers)
    assert (warning is not None) is warns
    if warning:
        assert running in warning and str(headers) in warning


def test_capability_advice_matches_the_manifest() -> None:
    """The fix names the capabilities daemonset/node.yaml adds to the agent."""
    from pathlib import Path

    import yaml

    from agent import preflight

    docs = list(yaml.safe_load_all(Path("daemonset/node.yaml").read_text()))
    ds = next(d for d in docs if d and d.get("kind") == "DaemonSet")
    agent = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
    added = set(agent["securityContext"]["capabilities"]["add"])
    assert "SYS_ADMIN" not in added
    src = Path(preflight.__file__).read_text()
    advice = src[src.index("def _check_privileges") :]
    for cap in added:
        assert cap in advice, cap
