"""Node preflight: can this machine run Veil's data plane? Each problem comes with its fix.

Checks, in order (later ones are skipped when an earlier one they need failed):

1. privileges: root, or CAP_NET_ADMIN + CAP_BPF + (CAP_SYS_ADMIN or CAP_PERFMON);
2. bcc importable (Debian's python3-bpfcc; the PyPI "bcc" is unrelated);
3. kernel headers at /lib/modules/$(uname -r)/build, or BCC_KERNEL_SOURCE;
4. bpffs under the pin directory (mounted here when missing and allowed);
5. bpf_sk_assign usable from tc: a tiny probe program is compiled and loaded.

:func:`run_preflight` returns a report (for ``veil agent preflight`` and
status pages); :meth:`PreflightReport.raise_for_problems` turns it into a
single :class:`~agent.errors.PreflightError` listing every problem.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.bpf.pins import BPFFS_ROOT, DEFAULT_PIN_DIR, ensure_bpffs
from agent.bpf.programs import DEFAULT_EBPF_DIR, PROBE, load_single
from agent.errors import AgentError, PreflightError

__all__ = [
    "PreflightCheck",
    "PreflightReport",
    "headers_fix",
    "missing_capabilities",
    "run_preflight",
]

CAP_NET_ADMIN: Final = 12
CAP_SYS_ADMIN: Final = 21
CAP_PERFMON: Final = 38
CAP_BPF: Final = 39

_DEBIAN_ARCH: Final = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class PreflightCheck:
    """One check: ``ok``, what was found, and the exact fix when not ok."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    skipped: bool = False
    # Passes, but something may bite later (shown as WARN, never fails the node).
    warning: str | None = None

    def problem(self) -> str:
        return f"{self.name}: {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class PreflightReport:
    checks: tuple[PreflightCheck, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(c.problem() for c in self.checks if not c.ok and not c.skipped)

    def raise_for_problems(self) -> None:
        if not self.ok:
            raise PreflightError(
                self.problems, hint="fix the items above, then run `veil agent preflight` again"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [
                {
                    "name": c.name,
                    "ok": c.ok,
                    "skipped": c.skipped,
                    "detail": c.detail,
                    "fix": c.fix,
                    "warning": c.warning,
                }
                for c in self.checks
            ],
        }


def missing_capabilities(cap_eff: int, euid: int) -> list[str]:
    """Capability names the data plane needs but ``cap_eff`` lacks (root counts as all)."""
    if euid == 0 and cap_eff == 0:
        # Root without capabilities (a confined container) cannot do anything
        # either; name what the DaemonSet grants (daemonset/node.yaml), not SYS_ADMIN.
        return ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"]

    def has(bit: int) -> bool:
        return bool(cap_eff & (1 << bit))

    missing = [name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"),) if not has(bit)]
    # CAP_BPF arrived in 5.8; CAP_SYS_ADMIN covers it (and everything bcc needs).
    if not has(CAP_BPF) and not has(CAP_SYS_ADMIN):
        missing.append("CAP_BPF")
    if not has(CAP_SYS_ADMIN) and not has(CAP_PERFMON):
        missing.append("CAP_PERFMON")
    return missing


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def headers_fix(release: str, machine: str, installed: list[str]) -> str:
    """The exact commands that give bcc kernel headers for ``release``.

    ``installed`` are the directory names under /usr/src (linux-headers-*).
    """
    arch = _DEBIAN_ARCH.get(machine, machine)
    flavour = sorted(
        d for d in installed if d.startswith("linux-headers-") and d.endswith(f"-{arch}")
    )
    common = sorted(
        d for d in installed if d.startswith("linux-headers-") and d.endswith("-common")
    )
    # Before the package is installed its version is unknown: let the shell find it.
    build = (
        f"/usr/src/{flavour[-1]}"
        if flavour
        else f"$(ls -d /usr/src/linux-headers-*-{arch} | tail -1)"
    )
    source = (
        f"/usr/src/{common[-1]}" if common else "$(ls -d /usr/src/linux-headers-*-common | tail -1)"
    )
    steps = []
    if not flavour:
        steps.append(f"apt-get install linux-headers-{arch}")
    steps.append(f"mkdir -p /lib/modules/{release}")
    steps.append(f"ln -sfn {build} /lib/modules/{release}/build")
    steps.append(f"ln -sfn {source} /lib/modules/{release}/source")
    return (
        " && ".join(steps)
        + " (or install the exact linux-headers-"
        + release
        + " package, or set BCC_KERNEL_SOURCE)"
    )


def headers_version(build: Path) -> str | None:
    """The kernel release a headers tree was built for (utsrelease.h, else its path)."""
    uts = build / "include" / "generated" / "utsrelease.h"
    try:
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    m = re.search(r"linux-headers-(\d+\.\d+[^/]*)", str(build.resolve()))
    return m.group(1) if m else None


def headers_mismatch(running: str, headers: str | None) -> str | None:
    """A warning when the headers are for another kernel version (major.minor)."""
    if headers is None:
        return None

    def major_minor(text: str) -> tuple[int, ...] | None:
        m = re.match(r"(\d+)\.(\d+)", text)
        return (int(m.group(1)), int(m.group(2))) if m else None

    run, hdr = major_minor(running), major_minor(headers)
    if run is None or hdr is None or run == hdr:
        return None
    return (
        f"kernel headers are for {headers}, the running kernel is {running}: programs that "
        "use only stable helpers work, but struct layouts or helpers newer than "
        f"{hdr[0]}.{hdr[1]} may fail to compile or verify; install headers for {running} "
        "if you can"
    )


def _check_privileges() -> PreflightCheck:
    missing = missing_capabilities(_effective_caps(), os.geteuid())
    if not missing:
        return PreflightCheck("privileges", True, "root or required capabilities present")
    return PreflightCheck(
        "privileges",
        False,
        f"missing {', '.join(missing)}",
        "grant NET_ADMIN, BPF and PERFMON (securityContext.capabilities.add, as "
        "daemonset/node.yaml does), or run the agent as root; SYS_ADMIN is needed only on "
        "kernels older than 5.8, which lack CAP_BPF and CAP_PERFMON",
    )


def _check_bcc() -> PreflightCheck:
    try:
        import bcc
    except ImportError as exc:
        return PreflightCheck(
            "bcc",
            False,
            f"import bcc failed: {exc}",
            "apt-get install python3-bpfcc, and create the venv with "
            "/usr/bin/python3 -m venv --system-site-packages (the PyPI package 'bcc' is unrelated)",
        )
    return PreflightCheck("bcc", True, f"bcc from {Path(bcc.__file__).parent}")


def _check_headers() -> PreflightCheck:
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        ok = Path(env, "include").is_dir()
        return PreflightCheck(
            "kernel headers",
            ok,
            f"BCC_KERNEL_SOURCE={env}" + ("" if ok else " has no include/ directory"),
            None if ok else "point BCC_KERNEL_SOURCE at a kernel headers tree",
        )
    release = platform.release()
    build = Path("/lib/modules", release, "build")
    if (build / "include").is_dir() or (build / "Makefile").is_file():
        headers = headers_version(build)
        return PreflightCheck(
            "kernel headers",
            True,
            f"{build} -> {build.resolve()}" + (f" (version {headers})" if headers else ""),
            warning=headers_mismatch(release, headers),
        )
    try:
        installed = sorted(os.listdir("/usr/src"))
    except OSError:
        installed = []
    return PreflightCheck(
        "kernel headers",
        False,
        f"no kernel headers at {build}",
        headers_fix(release, platform.machine(), installed),
    )


def _check_bpffs(pin_dir: Path, allow_mount: bool) -> PreflightCheck:
    try:
        mounted = ensure_bpffs(pin_dir, allow_mount=allow_mount)
    except AgentError as exc:
        return PreflightCheck("bpffs", False, exc.message, exc.hint)
    detail = f"mounted bpffs at {BPFFS_ROOT}" if mounted else f"{pin_dir} is on bpffs"
    return PreflightCheck("bpffs", True, detail)


def _check_sk_assign(ebpf_dir: Path) -> PreflightCheck:
    try:
        load_single(PROBE, ebpf_dir)
    except AgentError as exc:
        return PreflightCheck(
            "bpf_sk_assign",
            False,
            f"the probe program did not load: {exc.message.splitlines()[0]}",
            "needs Linux 5.7+ with CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF, "
            "CONFIG_NET_SCH_INGRESS; upgrade the kernel",
        )
    return PreflightCheck("bpf_sk_assign", True, "probe program with bpf_sk_assign loaded")


def run_preflight(
    pin_dir: Path = DEFAULT_PIN_DIR,
    *,
    allow_mount: bool = True,
    load_probe: bool = True,
    ebpf_dir: Path = DEFAULT_EBPF_DIR,
) -> PreflightReport:
    """Run every check; never raises for a failed check (see raise_for_problems)."""
    checks: list[PreflightCheck] = []

    def run(name: str, needs: tuple[str, ...], fn: Callable[[], PreflightCheck]) -> None:
        failed = [c.name for c in checks if c.name in needs and not c.ok]
        if failed:
            checks.append(
                PreflightCheck(name, False, f"skipped: needs {', '.join(failed)}", skipped=True)
            )
            return
        checks.append(fn())

    run("privileges", (), _check_privileges)
    run("bcc", (), _check_bcc)
    run("kernel headers", (), _check_headers)
    run("bpffs", ("privileges",), lambda: _check_bpffs(pin_dir, allow_mount))
    if load_probe:
        run(
            "bpf_sk_assign",
            ("privileges", "bcc", "kernel headers"),
            lambda: _check_sk_assign(ebpf_dir),
        )
    return PreflightReport(tuple(checks))
