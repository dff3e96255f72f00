"""ztunnel RSS with N held connections, alone (issue 12: ``ztunnel_rss_10k_connections``).

The same measurement as ``perf.bench_mesh`` (its ``Bench.rss_with_connections``
on a :class:`lab.mesh.LabMesh`, eBPF steering, one worker per ztunnel), without
the rest of the benchmark, so a memory change can be judged in half a minute.
``--warm`` first runs the mesh paths once (iperf3 1 and 4 streams, round trips,
new connections, same node), as the full benchmark does before it holds the
connections. Prints one JSON line: MB per node at start, after the warm-up,
and with the connections held.

    sudo .venv/bin/python -m perf.bench_rss --connections 10000 --warm
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from perf.bench_mesh import Bench, _registry

__all__ = ["main", "measure"]


def measure(connections: int, warm: bool, work: Path) -> dict[str, Any]:
    from lab.mesh import LabMesh

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    registry = work / "registry.yaml"
    registry.write_text(yaml.safe_dump(_registry(), sort_keys=False))
    (work / "mesh").mkdir()
    mesh = LabMesh(registry, workdir=work / "mesh", steering="ebpf", ztunnel_workers=1)
    with mesh:
        mesh.start()
        bench = Bench(mesh, work, 2.0)
        bench.start_servers()
        time.sleep(1.0)
        out: dict[str, Any] = {"started_mb": bench.ztunnel_rss()}
        if warm:
            for streams in (1, 4):
                bench.iperf("mesh", streams)
            bench.latency("mesh")
            bench.cps("mesh")
            bench.iperf("mesh-same-node", 1)
            bench.latency("mesh-same-node")
            time.sleep(1.0)
        out.update(bench.rss_with_connections(min(connections, max(0, hard - 2000))))
        return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_rss", description=__doc__)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--warm", action="store_true", help="run the mesh paths once first")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench_rss builds network namespaces: run it as root")
    with tempfile.TemporaryDirectory(prefix="veil-bench-rss-") as tmp:
        result = measure(args.connections, args.warm, Path(tmp))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
