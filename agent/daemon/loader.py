"""Preflight and program loading in a short-lived child process.

Compiling with bcc maps LLVM and clang into the process: about 130 MB of
resident memory that is never given back. The agent is a long-running
DaemonSet process with a 100 MB budget, so it never compiles itself: it
runs ``python -m agent.daemon.loader`` in its own network namespace, which
runs the preflight, then ``Dataplane.open`` (compile, pin, swap filters, or
nothing at all when the pins already hold this build) and exits. The agent
then opens the same pins, finds its build there and reuses them without
compiling.

The child prints one JSON object on stdout and exits 0 when the pins are
ready, 1 otherwise (preflight problems or a load error, each with its fix).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

from agent.bpf import PROGRAMS, DataplaneMaps, DataplaneOptions, PinLayout, compile_unit
from agent.errors import AgentError, PreflightError

from .errors import AgentStartupError

__all__ = ["LoadResult", "load_in_child", "main", "pins_current"]

_TIMEOUT = 180.0


@dataclass(frozen=True, slots=True)
class LoadResult:
    build_id: str
    reused: bool  # the pins already held this build: nothing was compiled
    preflight: tuple[dict[str, Any], ...]
    seconds: float


def pins_current(pin_dir: Path, options: DataplaneOptions) -> bool:
    """True when every pin exists and the pinned build is the one these sources make.

    Reads the config map through bpf(2) only: no compiler is involved.
    """
    layout = PinLayout(pin_dir)
    if not all(layout.program(spec.name).exists() for spec in PROGRAMS):
        return False
    try:
        maps = DataplaneMaps.open(layout)
    except AgentError:
        return False
    try:
        pinned = maps.config().build_id
    finally:
        maps.close()
    return pinned == compile_unit(options, pin_dir).build_id


def load_in_child(
    pin_dir: Path, options: DataplaneOptions, *, timeout: float = _TIMEOUT
) -> LoadResult:
    """Run the loader child; raise PreflightError / AgentStartupError with its message."""
    started = time.monotonic()
    argv = [sys.executable, "-m", "agent.daemon.loader", "--pin-dir", str(pin_dir)]
    if options.drop_udp:
        argv.append("--drop-udp")
    if options.allow_icmp_echo:
        argv.append("--allow-icmp-echo")
    if options.probe_source6 is not None:
        argv += ["--probe-source6", str(options.probe_source6)]
    argv += ["--ebpf-dir", str(options.ebpf_dir)]
    if not pins_current(pin_dir, options):
        argv.append("--probe")  # a compile is coming: check the kernel can take it first
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise AgentStartupError(
            f"loading the BPF programs took longer than {timeout:.0f}s",
            hint="the machine may be overloaded; run `veil agent preflight` to check the node",
        ) from None
    except OSError as exc:
        raise AgentStartupError(f"cannot start the program loader: {exc}") from None
    result = _parse(done.stdout)
    if result is None:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise AgentStartupError(
            f"the program loader exited {done.returncode} without a report:\n{tail}",
            hint="run `veil agent preflight` to check the node",
        )
    checks = tuple(result.get("preflight", ()))
    if result.get("problems"):
        raise PreflightError(
            tuple(result["problems"]),
            hint="fix the items above, then run `veil agent preflight` again",
        )
    if not result.get("ok"):
        raise AgentStartupError(
            str(result.get("error") or "loading the BPF programs failed"),
            hint=result.get("hint") or "run `veil agent preflight` to check the node",
        )
    return LoadResult(
        build_id=str(result["build_id"]),
        reused=bool(result["reused"]),
        preflight=checks,
        seconds=time.monotonic() - started,
    )


def _parse(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


def main(argv: Sequence[str] | None = None) -> int:
    # Imported here: the parent imports this module and must not pull in bcc.
    from agent.bpf import Dataplane
    from agent.preflight import run_preflight

    parser = argparse.ArgumentParser(prog="python -m agent.daemon.loader")
    parser.add_argument("--pin-dir", type=Path, required=True)
    parser.add_argument("--ebpf-dir", type=Path, default=None)
    parser.add_argument("--drop-udp", action="store_true")
    parser.add_argument("--allow-icmp-echo", action="store_true")
    parser.add_argument("--probe-source6", type=IPv6Address, default=None)
    parser.add_argument("--probe", action="store_true", help="load the bpf_sk_assign probe")
    args = parser.parse_args(argv)
    options = DataplaneOptions(
        drop_udp=args.drop_udp,
        allow_icmp_echo=args.allow_icmp_echo,
        probe_source6=args.probe_source6,
    )
    if args.ebpf_dir is not None:
        options = replace(options, ebpf_dir=args.ebpf_dir)
    report = run_preflight(args.pin_dir, load_probe=args.probe, ebpf_dir=options.ebpf_dir)
    out: dict[str, Any] = {"preflight": report.to_dict()["checks"]}
    if not report.ok:
        out.update(ok=False, problems=list(report.problems))
        print(json.dumps(out), flush=True)
        return 1
    try:
        plane = Dataplane.open(args.pin_dir, options)
        # Closing releases fds only: programs, filters and pins stay for the agent.
        plane.close()
        out.update(ok=True, build_id=plane.build_id, reused=plane.reused_pins)
    except AgentError as exc:
        out.update(ok=False, error=exc.message, hint=exc.hint)
        print(json.dumps(out), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
