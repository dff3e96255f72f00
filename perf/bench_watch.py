"""Discovery watch fan-out: a registry change reaching 50 nodes, and controller memory.

Setup: the real controller (``veil controller run``) in its own process on
loopback, serving a registry of ``--workloads`` workloads (default 10,000) and
``--policies`` AuthorizationPolicies (default 1,000), plus 500 Services. The
registry is a directory (one file per node's workloads, one for policies, one
for services and namespaces), the layout recommended for large registries:
an edit re-parses only the file it touched. ``--layout file`` puts everything in
one file instead (each change then re-parses the whole YAML; reported, not the
target). ``--watchers`` nodes (default 50) join with real join tokens and each
watches over its own mutual-TLS gRPC channel, holding the full state.

Timed phase: ``--changes`` times (default 20) one workload's labels are edited
in its file (write aside, rename over, as editors do). For every watcher the
clock runs from the rename to the arrival of the update carrying that change.
Reported: latency percentiles over all (change, watcher) samples and per change
the time until the last watcher had it, split into "detect + parse + publish"
(from the controller's "registry reloaded" log line) and "fan-out". The
controller's RSS is sampled (psutil) through the whole run; the peak is
reported.

Targets: p99 of change-to-every-watcher under 1 s; controller RSS under 300 MB.

Run: ``.venv/bin/python perf/bench_watch.py [--watchers 50] [--changes 20]``
Writes ``perf/results/watch.json`` (value, target, pass).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.api.client import ControllerClient, join_node
from controller.api.model import ResourceType, Workload, resource_key
from controller.api.spiffe import node_identity
from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from node import NodeCredentials, build_csr, generate_key, key_pem
from tests.support.controller import ControllerProcess

ROOT = Path(__file__).resolve().parents[1]

TD = "cluster.local"
TARGET_P99_S = 1.0
TARGET_RSS_MB = 300.0
RESULTS = ROOT / "perf" / "results" / "watch.json"
NAMESPACES = 20
CHANGE_LABEL = "bench-change"
_RELOADED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*registry reloaded")


def _workload(i: int, nodes: int, change: int | None = None) -> dict[str, Any]:
    labels = {"app": f"app{i % 500}", "version": "v1"}
    if change is not None:
        labels[CHANGE_LABEL] = str(change)
    return {
        "name": f"w{i}",
        "namespace": f"ns{i % NAMESPACES}",
        "serviceAccount": f"sa{i % 100}",
        "node": f"node-{i % nodes}",
        "ips": [f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"],
        "labels": labels,
    }


class Registry:
    """The generated registry on disk, and edits to it."""

    def __init__(self, root: Path, layout: str, workloads: int, policies: int, nodes: int) -> None:
        self.layout = layout
        self.nodes = nodes
        self.workloads = workloads
        self.path = root / ("registry.d" if layout == "dir" else "registry.yaml")
        self.changes: dict[int, int] = {}  # workload index -> change number
        self._base: dict[str, Any] = {
            "trustDomain": TD,
            "namespaces": [
                {"name": f"ns{i}", "labels": {"veil.io/dataplane-mode": "ambient"}}
                for i in range(NAMESPACES)
            ],
            "services": [
                {
                    "name": f"svc{i}",
                    "namespace": f"ns{i % NAMESPACES}",
                    "vips": [f"10.96.{i // 256}.{i % 256}"],
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                    "selector": {"app": f"app{i}"},
                }
                for i in range(500)
            ],
        }
        self._policies = [
            {
                "name": f"p{i}",
                "namespace": f"ns{i % NAMESPACES}",
                "spec": {
                    "selector": {"matchLabels": {"app": f"app{i % 500}"}},
                    "action": "DENY" if i % 10 == 0 else "ALLOW",
                    "rules": [
                        {
                            "from": [
                                {
                                    "source": {
                                        "principals": [
                                            f"{TD}/ns/ns{(i + 1) % NAMESPACES}/sa/sa{i % 100}"
                                        ]
                                    }
                                }
                            ],
                            "to": [{"operation": {"ports": ["8080"]}}],
                        }
                    ],
                },
            }
            for i in range(policies)
        ]
        if layout == "dir":
            self.path.mkdir()
            self._dump(self.path / "00-mesh.yaml", self._base)
            self._dump(self.path / "policies.yaml", {"authorizationPolicies": self._policies})
            for n in range(nodes):
                self._write_node(n)
        else:
            self._write_all()

    @staticmethod
    def _dump(path: Path, doc: dict[str, Any]) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.dump(doc, Dumper=yaml.CSafeDumper, sort_keys=False))
        os.replace(tmp, path)

    def _node_workloads(self, n: int) -> list[dict[str, Any]]:
        return [
            _workload(i, self.nodes, self.changes.get(i))
            for i in range(n, self.workloads, self.nodes)
        ]

    def _write_node(self, n: int) -> None:
        self._dump(self.path / f"node-{n:03d}.yaml", {"workloads": self._node_workloads(n)})

    def _write_all(self) -> None:
        doc = dict(self._base)
        doc["workloads"] = [
            _workload(i, self.nodes, self.changes.get(i)) for i in range(self.workloads)
        ]
        doc["authorizationPolicies"] = self._policies
        self._dump(self.path, doc)

    def change(self, number: int, index: int) -> str:
        """Labels workload ``index`` with change ``number``; returns the workload key."""
        self.changes[index] = number
        if self.layout == "dir":
            self._write_node(index % self.nodes)
        else:
            self._write_all()
        return f"ns{index % NAMESPACES}/w{index}"


def start_controller(work: Path, registry: Path, poll: float) -> ControllerProcess:
    """``veil controller run`` on ephemeral loopback ports, logging at info (reload lines)."""
    return ControllerProcess(
        work,
        registry_path=registry,
        registry_poll=poll,
        log_level="info",
        state_path=work / "controller",
        start_timeout=180.0,  # parsing a 10,000-workload registry takes a while
    ).start()


def rss_mb(ctl: ControllerProcess) -> float:
    assert ctl.proc is not None
    return float(psutil.Process(ctl.proc.pid).memory_info().rss) / (1024 * 1024)


def reload_times(ctl: ControllerProcess) -> list[float]:
    """Wall-clock times of the controller's "registry reloaded" log lines."""
    out = []
    for line in ctl.log_text().splitlines():
        m = _RELOADED.match(line)
        if m:
            out.append(datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


def _fingerprint(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


async def join_nodes(ctl: ControllerProcess, nodes: int) -> list[NodeCredentials]:
    """Real token joins on the join listener; the token's root is pinned from the CA state."""
    ca = CertificateAuthority.load(ctl.state_dir)
    (root,) = (r for r in ca.trust_bundle().roots if _fingerprint(r) == ca.fingerprint)
    tokens = JoinTokenStore(ctl.state_dir)
    out = []
    for i in range(nodes):
        node = f"node-{i}"
        token = tokens.create(node, timedelta(minutes=30), ca_fingerprint=ca.fingerprint)
        key = generate_key()
        result = await join_node(
            ctl.join_addr, root, token, node, build_csr(key, node_identity(TD, node))
        )
        out.append(
            NodeCredentials(
                node=node,
                trust_domain=TD,
                controller_address=ctl.mtls,
                join_address=ctl.join_addr,
                key_pem=key_pem(key),
                cert_chain_pem=result.cert_chain,
                trust_bundle_pem=result.trust_bundle,
            )
        )
    return out


class WatchingNode:
    """One node's watch stream; records when each bench change arrives."""

    def __init__(self, creds: NodeCredentials) -> None:
        self.node = creds.node
        self.client: ControllerClient = creds.client()
        self.resources = 0
        self.snapshot = asyncio.Event()
        self.arrivals: dict[int, float] = {}  # change number -> wall clock
        self.got_change = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        held: set[tuple[ResourceType, str]] = set()
        async for update in self.client.watch(self.node):
            now = time.time()
            if update.snapshot:
                held.clear()
            for r in update.upserts:
                held.add(resource_key(r))
                if isinstance(r, Workload) and CHANGE_LABEL in r.labels:
                    self.arrivals.setdefault(int(r.labels[CHANGE_LABEL]), now)
                    self.got_change.set()
            for k in update.removals:
                held.discard(k)
            self.resources = len(held)
            if update.snapshot:
                self.snapshot.set()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        await self.client.close()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="veil-bench-watch-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        registry = Registry(work, args.layout, args.workloads, args.policies, args.watchers)
        print(f"registry written ({args.layout}) in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        ctl = start_controller(work, registry.path, args.poll)
        print(f"controller up in {time.perf_counter() - t:.1f}s: {ctl.startup_line}")
        rss_samples: list[float] = []
        sampling = True

        async def sample_rss() -> None:
            while sampling:
                try:
                    rss_samples.append(rss_mb(ctl))
                except psutil.Error:
                    return
                await asyncio.sleep(0.1)

        rss_idle = rss_mb(ctl)
        print(f"controller RSS with the registry loaded, no watchers: {rss_idle:.0f} MB")
        sampler = asyncio.create_task(sample_rss())
        watchers: list[WatchingNode] = []
        try:
            creds = await join_nodes(ctl, args.watchers)
            t = time.perf_counter()
            watchers = [WatchingNode(c) for c in creds]
            try:
                await asyncio.wait_for(asyncio.gather(*(w.snapshot.wait() for w in watchers)), 300)
            except TimeoutError:
                have = sum(1 for w in watchers if w.snapshot.is_set())
                raise SystemExit(
                    f"only {have}/{len(watchers)} watchers received their snapshot within 300 s"
                ) from None
            snapshot_s = time.perf_counter() - t
            sizes = {w.resources for w in watchers}
            print(
                f"{len(watchers)} watchers hold their snapshot ({sizes} resources) after {snapshot_s:.1f}s"
            )
            rss_after_snapshot = rss_mb(ctl)

            starts: dict[int, float] = {}
            for n in range(args.changes):
                await asyncio.sleep(0.3 + (n % 5) * 0.07)  # spread changes over the poll phase
                index = (n * 7919) % args.workloads
                starts[n] = time.time()
                registry.change(n, index)
                deadline = time.monotonic() + 30
                while any(n not in w.arrivals for w in watchers) and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                done = sum(1 for w in watchers if n in w.arrivals)
                last = max(
                    (w.arrivals[n] for w in watchers if n in w.arrivals), default=float("nan")
                )
                print(
                    f"change {n + 1:2d}: {done}/{len(watchers)} watchers, last after {last - starts[n]:.3f}s"
                )
        finally:
            for w in watchers:
                await w.close()
            sampling = False
            await sampler
            reloads = reload_times(ctl)
            ctl.stop()

    samples = [w.arrivals[n] - starts[n] for w in watchers for n in starts if n in w.arrivals]
    missing = len(starts) * len(watchers) - len(samples)
    per_change_all = [
        max(w.arrivals[n] for w in watchers) - starts[n]
        for n in starts
        if all(n in w.arrivals for w in watchers)
    ]
    # Split each change at the controller's "registry reloaded" line (logged after publish).
    detect, fanout = [], []
    for n, start in starts.items():
        after = [r for r in reloads if r >= start - 0.002]
        if after and all(n in w.arrivals for w in watchers):
            detect.append(after[0] - start)
            fanout.append(max(w.arrivals[n] for w in watchers) - after[0])
    p99 = _pct(samples, 0.99) if samples else float("inf")
    rss_peak = max(rss_samples) if rss_samples else float("nan")
    ok = missing == 0 and p99 < TARGET_P99_S and rss_peak < TARGET_RSS_MB
    ms = lambda v: round(v * 1000, 1)  # noqa: E731
    return {
        "benchmark": "discovery_watch_fanout",
        "metric": "p99 time from a registry file edit to the update at every watcher",
        "value": ms(p99),
        "unit": "ms",
        "target": TARGET_P99_S * 1000,
        "pass": ok,
        "workloads": args.workloads,
        "authorization_policies": args.policies,
        "services": 500,
        "watchers": args.watchers,
        "changes": args.changes,
        "registry_layout": args.layout,
        "registry_poll_s": args.poll,
        "missing_deliveries": missing,
        "latency_ms": {
            "p50": ms(statistics.median(samples)) if samples else None,
            "p90": ms(_pct(samples, 0.9)) if samples else None,
            "p99": ms(p99),
            "max": ms(max(samples)) if samples else None,
        },
        "last_watcher_per_change_ms": {
            "p50": ms(statistics.median(per_change_all)) if per_change_all else None,
            "max": ms(max(per_change_all)) if per_change_all else None,
        },
        "breakdown_ms": {
            "detect_parse_publish_median": ms(statistics.median(detect)) if detect else None,
            "fanout_to_last_watcher_median": ms(statistics.median(fanout)) if fanout else None,
            "fanout_to_last_watcher_max": ms(max(fanout)) if fanout else None,
        },
        "snapshot_to_all_watchers_s": round(snapshot_s, 2),
        "controller_rss_mb": {
            "peak": round(rss_peak, 1),
            "after_snapshots": round(rss_after_snapshot, 1),
            "loaded_no_watchers": round(rss_idle, 1),
            "target": TARGET_RSS_MB,
        },
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workloads", type=int, default=10_000)
    p.add_argument("--policies", type=int, default=1_000)
    p.add_argument("--watchers", type=int, default=50)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--layout", choices=["dir", "file"], default="dir")
    p.add_argument(
        "--poll", type=float, default=0.5, help="controller --registry-poll (default 0.5)"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    result = asyncio.run(bench(args))
    print(
        f"watch fan-out: p99 {result['latency_ms']['p99']} ms to every watcher "
        f"(target {TARGET_P99_S * 1000:.0f} ms), controller RSS peak "
        f"{result['controller_rss_mb']['peak']} MB (target {TARGET_RSS_MB:.0f}) -> "
        f"{'PASS' if result['pass'] else 'FAIL'}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
