"""A multi-core ztunnel: new connections/s and 4-stream throughput, 1 vs 2 workers.

The same lab as :mod:`perf.bench_mesh` (two nodes, the real controller, eBPF
steering by default), started once per worker count with
``veil ztunnel run --workers N`` on both nodes. For each count, over
``--rounds`` rounds (medians reported, samples kept): iperf3 with 4 parallel
streams client -> server across the nodes, and new connections per second
(connect, 1-byte exchange, close; 8 in parallel), plus the CPU seconds all
ztunnel processes (supervisor and workers) spent per 1,000 connections.

``nproc`` is recorded: the load generators (iperf3, the connection client and
the echo servers) share the machine's cores with the ztunnels, so on a
2-core machine a second worker competes with them instead of using an idle
core. Where at least 4 cores are free, 1 -> 2 workers should give >= 1.7x.

Run: ``.venv/bin/python -m perf.bench_workers [--seconds S] [--rounds R]``
(root). Writes ``perf/results/workers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from perf.bench_mesh import Bench, _registry
from perf.mesh_report import git_commit

__all__ = ["main", "run_workers_bench"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "perf" / "results"
SCALING_TARGET = 1.7  # 1 -> 2 workers, where >= 4 cores are available


def _measure(
    workers: int, seconds: float, rounds: int, work: Path, steering: str
) -> dict[str, Any]:
    from lab.mesh import LabMesh

    registry = work / "registry.yaml"
    registry.write_text(yaml.safe_dump(_registry(), sort_keys=False))
    (work / "mesh").mkdir()
    mesh = LabMesh(
        registry,
        workdir=work / "mesh",
        steering=steering,
        ztunnel_workers=workers,
    )
    with mesh:
        mesh.start()
        bench = Bench(mesh, work, seconds)
        bench.start_servers()
        gbps: list[float] = []
        cps: list[float] = []
        for _ in range(rounds):
            gbps.append(bench.iperf("mesh", 4))
            cps.append(bench.cps("mesh"))
        cpu = bench.cpu.get("mesh/per_1000_connections", [])
        return {
            "workers": workers,
            "throughput_4_streams_gbps": statistics.median(gbps),
            "conns_per_s": statistics.median(cps),
            "cpu_s_per_1000_connections": statistics.median(cpu) if cpu else None,
            "samples": {"throughput_4_streams_gbps": gbps, "conns_per_s": cps, "cpu": cpu},
            "notes": bench.notes,
        }


def run_workers_bench(seconds: float, rounds: int, steering: str = "ebpf") -> dict[str, Any]:
    by_count: dict[str, Any] = {}
    for n in (1, 2):
        with tempfile.TemporaryDirectory(prefix=f"veil-bench-workers-{n}-") as tmp:
            by_count[str(n)] = _measure(n, seconds, rounds, Path(tmp), steering)
    one, two = by_count["1"], by_count["2"]
    nproc = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0))
    return {
        "bench": "workers",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": platform.node(),
        "kernel": platform.release(),
        "nproc": nproc,
        "usable_cpus": usable,
        "steering": steering,
        "seconds": seconds,
        "rounds": rounds,
        "by_workers": by_count,
        "scaling_1_to_2": {
            "conns_per_s": two["conns_per_s"] / one["conns_per_s"] if one["conns_per_s"] else None,
            "throughput_4_streams": (
                two["throughput_4_streams_gbps"] / one["throughput_4_streams_gbps"]
                if one["throughput_4_streams_gbps"]
                else None
            ),
            "target": SCALING_TARGET,
            "target_applies": usable >= 4,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"ztunnel workers on {result['nproc']} CPUs ({result['steering']} steering)")
    print(f"{'workers':>8} {'conn/s':>10} {'4-stream Gbit/s':>16} {'CPU s/1k conns':>15}")
    for n, r in result["by_workers"].items():
        cpu = r["cpu_s_per_1000_connections"]
        print(
            f"{n:>8} {r['conns_per_s']:>10.0f} {r['throughput_4_streams_gbps']:>16.2f} "
            f"{cpu if cpu is None else round(cpu, 3)!s:>15}"
        )
    s = result["scaling_1_to_2"]
    applies = "" if s["target_applies"] else " (target needs >= 4 CPUs; not applicable here)"
    print(
        f"1 -> 2 workers: conn/s x{s['conns_per_s']:.2f}, "
        f"4-stream throughput x{s['throughput_4_streams']:.2f}; target >= {s['target']}x{applies}"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_workers")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steering", default="ebpf", choices=("ebpf", "tproxy"))
    args = parser.parse_args(argv)
    result = run_workers_bench(args.seconds, args.rounds, args.steering)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


if __name__ == "__main__":
    main()
