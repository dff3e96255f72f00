"""The mesh data path against direct traffic and an stunnel4 mTLS chain, on the lab.

Setup (one run, one topology): E1's lab (:class:`lab.mesh.LabMesh`) with
two nodes, the real controller and ``veil ztunnel run`` on each node, pods
steered by nftables TPROXY. Six pods:

=============  ======  ==============================================
pod            node    role
=============  ======  ==============================================
client         node-a  enrolled; the mesh client
peer           node-a  enrolled; same-node mesh server
plain-client   node-a  not enrolled; direct and stunnel client
plain-peer     node-a  not enrolled; same-node direct server
server         node-b  enrolled; the mesh server
plain-server   node-b  not enrolled; direct and stunnel server
=============  ======  ==============================================

Paths compared:

* **mesh**: client -> ztunnel(node-a) -> HBONE (mTLS, HTTP/2) -> ztunnel(node-b) -> server;
* **direct**: plain-client -> plain-server, routed, no proxy;
* **stunnel**: plain-client -> stunnel client (node-a) -> TLS 1.3 with client
  certificates (ECDSA P-256) -> stunnel server (node-b) -> plain-server: the
  same two proxy hops and the same crypto, from a mature C implementation.

Measured, with the paths interleaved and every measurement repeated
``--rounds`` times (default 3; medians are reported, all samples kept under
``raw``): iperf3 throughput with 1 and 4 streams (3 s each); request/response
latency p50/p99 over one connection (64-byte messages, 2,000 round trips after
a warm-up run); new connections per second (connect, 1-byte exchange, close; 8
in parallel, 3 s); same-node throughput and p50 (client -> peer) against direct
same-node; the CPU seconds (user + system, from /proc, :mod:`perf.cpu`) that
the two ztunnels and the two stunnels spend per GB (1-stream runs) and per
1,000 new connections; and the RSS of each ztunnel while ``--connections``
(default 10,000) connections are held open through the mesh. Clients are the
small programs in :mod:`perf.mesh_workers`, run inside the pods, or iperf3.

Targets (ratio = mesh / baseline): throughput >= 1.5x stunnel (1 and 4
streams), new connections/s >= 2.5x stunnel, p50 <= 1.1x and p99 <= 1.2x
stunnel, same-node throughput >= 0.8x and same-node p50 <= 1.2x direct, CPU per
GB <= 1.0x and CPU per connection <= 0.5x stunnel's, ztunnel RSS with 10k
connections <= 150 MB.

Run: ``.venv/bin/python -m perf.bench_mesh [--connections N] [--seconds S] [--rounds R]``
(root). Writes ``perf/results/latest.json`` (section ``mesh``),
``perf/results/mesh.json`` and ``perf/results/mesh.png``. ``python -m perf.run``
calls :func:`main`. Machines with 2 shared cores give noisy numbers: the
report says what it measured, not what it hoped for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from perf.cpu import CpuMeter
from perf.mesh_report import git_commit, print_side_by_side, print_table, write_outputs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "perf" / "results"
IPERF_PORT = 5201
ECHO_PORT = 7000
STUNNEL_PORTS = {IPERF_PORT: (15501, 15502), ECHO_PORT: (15511, 15512)}
TARGETS = {
    "throughput_1_stream": (">=", 1.5),
    "throughput_4_streams": (">=", 1.5),
    "new_connections_per_s": (">=", 2.5),
    "latency_p50": ("<=", 1.1),
    "latency_p99": ("<=", 1.2),
    "same_node_throughput": (">=", 0.8),
    "same_node_latency_p50": ("<=", 1.2),
    "cpu_per_gb": ("<=", 1.0),
    "cpu_per_1000_connections": ("<=", 0.5),
    "ztunnel_rss_10k_connections": ("<=", 150.0),
}

# -- the benchmark -------------------------------------------------------------


def _registry() -> dict[str, Any]:
    def pod(name: str, ns: str, node: str, ip: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": ns,
            "serviceAccount": name,
            "node": node,
            "ips": [ip],
            "labels": {"app": name},
        }

    return {
        "trustDomain": "cluster.local",
        "namespaces": [
            {"name": "shop", "labels": {"veil.io/dataplane-mode": "ambient"}},
            {"name": "legacy"},
        ],
        "workloads": [
            pod("client", "shop", "node-a", "10.244.1.10"),
            pod("peer", "shop", "node-a", "10.244.1.11"),
            pod("plain-client", "legacy", "node-a", "10.244.1.12"),
            pod("plain-peer", "legacy", "node-a", "10.244.1.13"),
            pod("server", "shop", "node-b", "10.244.2.10"),
            pod("plain-server", "legacy", "node-b", "10.244.2.12"),
        ],
    }


def _stunnel_material(work: Path) -> dict[str, Path]:
    """A CA and ECDSA P-256 client/server certificates for the stunnel chain."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bench-ca"))
        .issuer_name(name("bench-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": work / "ca.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, eku in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"bench-{role}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out[role] = work / f"{role}.pem"
        out[role].write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(out[role], 0o600)
    return out


def _stunnel_conf(role: str, material: dict[str, Path], peer_ip: str, target_ip: str) -> str:
    lines = ["foreground = yes", "pid =", "debug = 4"]
    for app_port, (front, back) in STUNNEL_PORTS.items():
        lines += [f"[p{app_port}]", f"cert = {material[role]}", f"CAfile = {material['ca']}"]
        lines += ["verifyChain = yes", "sslVersionMin = TLSv1.3"]
        lines += ["socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"]
        if role == "client":
            lines += ["client = yes", f"accept = 0.0.0.0:{front}", f"connect = {peer_ip}:{back}"]
        else:
            lines += [f"accept = 0.0.0.0:{back}", f"connect = {target_ip}:{app_port}"]
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, mesh: Any, work: Path, seconds: float) -> None:
        self.mesh = mesh
        self.topo = mesh.topo
        self.work = work
        self.seconds = seconds
        self.notes: list[str] = []
        # CPU seconds of the tunnel processes, per GB (1-stream runs) and per
        # 1,000 new connections, one sample per round: "<path>/per_gb" etc.
        self.cpu: dict[str, list[float]] = {}

    def ns(self, pod: str) -> str:
        return str(self.mesh.pod(pod).lab.netns)

    def ip(self, pod: str) -> str:
        return str(self.mesh.pod(pod).ip)

    def run_json(self, pod: str, argv: list[str], timeout: float = 120) -> Any:
        from lab.process import netns_argv

        done = subprocess.run(
            netns_argv(self.ns(pod), argv), capture_output=True, timeout=timeout, cwd=ROOT
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[:4]} in {pod} failed: {done.stderr.decode()[-2000:]}")
        return json.loads(done.stdout.decode().strip().splitlines()[-1])

    def worker_argv(self, *args: object) -> list[str]:
        return [sys.executable, "-m", "perf.mesh_workers", *(str(a) for a in args)]

    def start_servers(self) -> None:
        from lab.process import wait_listening

        for pod in ("server", "plain-server", "peer", "plain-peer"):
            proc = self.topo.popen(self.ns(pod), ["iperf3", "-s", "-p", str(IPERF_PORT)])
            wait_listening(proc, IPERF_PORT, 10)
        for pod in ("server", "plain-server", "peer", "plain-peer"):
            proc = self.topo.popen(
                self.ns(pod), self.worker_argv("echo-server", ECHO_PORT), cwd=ROOT
            )
            wait_listening(proc, ECHO_PORT, 10)

    def start_stunnel(self) -> None:
        from lab.process import wait_listening

        material = _stunnel_material(self.work)
        node_a, node_b = self.topo.node("node-a"), self.topo.node("node-b")
        self.stunnel_pids: list[int] = []
        for role, node in (("server", node_b), ("client", node_a)):
            conf = self.work / f"stunnel-{role}.conf"
            conf.write_text(
                _stunnel_conf(role, material, node_b.underlay_ip, self.ip("plain-server"))
            )
            proc = self.topo.popen(
                node, ["stunnel4", str(conf)], log_path=self.work / f"stunnel-{role}.log"
            )
            self.stunnel_pids.append(proc.pid)
            for front, back in STUNNEL_PORTS.values():
                wait_listening(proc, back if role == "server" else front, 10)

    def target(self, path: str, app_port: int) -> tuple[str, str, int]:
        """(client pod, host, port) for a path and an application port."""
        if path == "mesh":
            return "client", self.ip("server"), app_port
        if path == "direct":
            return "plain-client", self.ip("plain-server"), app_port
        if path == "stunnel":
            return "plain-client", self.topo.node("node-a").underlay_ip, STUNNEL_PORTS[app_port][0]
        if path == "mesh-same-node":
            return "client", self.ip("peer"), app_port
        if path == "direct-same-node":
            return "plain-client", self.ip("plain-peer"), app_port
        raise ValueError(path)

    def meter(self, path: str) -> CpuMeter | None:
        """The tunnel processes that carry ``path``: both ztunnels, or both stunnels."""
        if path.startswith("mesh"):
            return CpuMeter(proc.pid for proc in self.mesh.ztunnels.values())
        if path == "stunnel":
            return CpuMeter(self.stunnel_pids)
        return None

    def iperf(self, path: str, streams: int) -> float:
        pod, host, port = self.target(path, IPERF_PORT)
        argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(self.seconds), "-O", "1"]
        argv += ["-P", str(streams), "-J"]
        from lab.process import netns_argv

        meter = self.meter(path)
        if meter is not None:
            meter.start()
        done = subprocess.run(
            netns_argv(self.ns(pod), argv), capture_output=True, timeout=self.seconds + 60
        )
        data = json.loads(done.stdout.decode() or "{}")
        if "error" in data or "end" not in data:
            raise RuntimeError(f"iperf3 over {path}: {data.get('error', done.stderr.decode())}")
        received = data["end"]["sum_received"]
        if meter is not None and streams == 1:
            per_gb = meter.stop().per_gb(float(received["bytes"]))
            if per_gb is not None:
                self.cpu.setdefault(f"{path}/per_gb", []).append(per_gb)
        return float(received["bits_per_second"]) / 1e9

    def latency(self, path: str) -> dict[str, float]:
        pod, host, port = self.target(path, ECHO_PORT)
        # A throwaway run first: the first connection of a path pays for pooled
        # HBONE connections, certificate contexts and cold caches.
        self.run_json(pod, self.worker_argv("rr-client", host, port, 200, 64))
        return dict(self.run_json(pod, self.worker_argv("rr-client", host, port, 2000, 64)))

    def cps(self, path: str) -> float:
        pod, host, port = self.target(path, ECHO_PORT)
        meter = self.meter(path)
        if meter is not None:
            meter.start()
        result = self.run_json(pod, self.worker_argv("cps-client", host, port, self.seconds, 8))
        if meter is not None:
            per_1000 = meter.stop().per_1000(result["conns_per_s"] * self.seconds)
            if per_1000 is not None:
                self.cpu.setdefault(f"{path}/per_1000_connections", []).append(per_1000)
        if result["failed"]:
            self.notes.append(f"{path}: {result['failed']} new connections failed")
        return float(result["conns_per_s"])

    def ztunnel_rss(self) -> dict[str, float]:
        """MB per node: the ztunnel's Python processes summed (supervisor and workers)."""
        import psutil

        out = {}
        for node, proc in self.mesh.ztunnels.items():
            p = psutil.Process(proc.pid)
            procs = [p, *p.children(recursive=True)]
            pythons = [q for q in procs if "python" in q.name()] or procs
            out[node] = sum(q.memory_info().rss for q in pythons) / 2**20
        return out

    def rss_with_connections(self, count: int) -> dict[str, Any]:
        from lab.process import netns_argv

        before = self.ztunnel_rss()
        pod, host, port = self.target("mesh", ECHO_PORT)
        proc = subprocess.Popen(
            netns_argv(self.ns(pod), self.worker_argv("hold-client", host, port, count)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().decode()
            if not line:
                raise RuntimeError("hold-client exited before reporting")
            opened = json.loads(line)
            time.sleep(1.0)
            during = self.ztunnel_rss()
            live = {n: len(self.mesh.config_dump(n)["connections"]) for n in self.mesh.ztunnels}
            proc.stdin.close()
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        return {"before_mb": before, "during_mb": during, "opened": opened, "registered": live}


def _ratio(metric: str, value: float, baseline: float | None) -> dict[str, Any]:
    op, target = TARGETS[metric]
    ratio = value / baseline if baseline else None
    judged = ratio if baseline is not None else value
    passed = judged is not None and (judged >= target if op == ">=" else judged <= target)
    return {
        "value": round(value, 3),
        "baseline": round(baseline, 3) if baseline is not None else None,
        "ratio": round(ratio, 3) if ratio is not None else None,
        "target": f"{op} {target}",
        "pass": passed,
    }


def run_bench(
    connections: int, seconds: float, rounds: int, work: Path, steering: str = "ebpf"
) -> dict[str, Any]:
    from lab.mesh import LabMesh

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    notes: list[str] = []
    capped = min(connections, max(0, hard - 2000))
    if capped < connections:
        notes.append(
            f"open-connection count capped at {capped} (RLIMIT_NOFILE hard limit {hard}; "
            "each held connection costs one descriptor in the client and in each ztunnel)"
        )
    registry = work / "registry.yaml"
    registry.write_text(yaml.safe_dump(_registry(), sort_keys=False))
    (work / "mesh").mkdir()
    # Production logging (INFO: one access log line per connection) on purpose.
    # One worker per ztunnel: the ratios compare one Python process per node with
    # stunnel's one process per node; perf/bench_workers.py measures the scaling.
    mesh = LabMesh(registry, workdir=work / "mesh", steering=steering, ztunnel_workers=1)
    with mesh:
        mesh.start()
        bench = Bench(mesh, work, seconds)
        bench.start_servers()
        bench.start_stunnel()
        # Paths are interleaved and each measurement repeated ``rounds`` times;
        # the median counts. On a shared machine one sample per path is noise.
        samples: dict[str, dict[str, list[Any]]] = {
            "throughput_gbps": {},
            "latency_us": {},
            "conns_per_s": {},
        }
        for _ in range(rounds):
            for path in ("mesh", "direct", "stunnel"):
                for streams in (1, 4):
                    key = f"{path}/{streams}"
                    samples["throughput_gbps"].setdefault(key, []).append(
                        bench.iperf(path, streams)
                    )
                samples["latency_us"].setdefault(path, []).append(bench.latency(path))
                samples["conns_per_s"].setdefault(path, []).append(bench.cps(path))
            for path in ("mesh-same-node", "direct-same-node"):
                samples["throughput_gbps"].setdefault(f"{path}/1", []).append(bench.iperf(path, 1))
                samples["latency_us"].setdefault(path, []).append(bench.latency(path))
        raw: dict[str, Any] = {
            "rounds": rounds,
            "samples": samples,
            "throughput_gbps": {
                k: statistics.median(v) for k, v in samples["throughput_gbps"].items()
            },
            "conns_per_s": {k: statistics.median(v) for k, v in samples["conns_per_s"].items()},
            "latency_us": {
                k: {q: statistics.median(r[q] for r in v) for q in ("p50_us", "p99_us", "mean_us")}
                for k, v in samples["latency_us"].items()
            },
        }
        raw["cpu_seconds"] = {
            "samples": bench.cpu,
            "median": {k: statistics.median(v) for k, v in bench.cpu.items()},
        }
        raw["rss"] = bench.rss_with_connections(capped)
        notes += bench.notes
    t = raw["throughput_gbps"]
    lat = raw["latency_us"]
    cps = raw["conns_per_s"]
    rss = raw["rss"]
    cpu = raw["cpu_seconds"]["median"]
    opened = int(rss["opened"]["opened"])
    metrics = {
        "throughput_1_stream": _ratio("throughput_1_stream", t["mesh/1"], t["stunnel/1"]),
        "throughput_4_streams": _ratio("throughput_4_streams", t["mesh/4"], t["stunnel/4"]),
        "new_connections_per_s": _ratio("new_connections_per_s", cps["mesh"], cps["stunnel"]),
        "latency_p50": _ratio("latency_p50", lat["mesh"]["p50_us"], lat["stunnel"]["p50_us"]),
        "latency_p99": _ratio("latency_p99", lat["mesh"]["p99_us"], lat["stunnel"]["p99_us"]),
        "same_node_throughput": _ratio(
            "same_node_throughput", t["mesh-same-node/1"], t["direct-same-node/1"]
        ),
        "same_node_latency_p50": _ratio(
            "same_node_latency_p50",
            lat["mesh-same-node"]["p50_us"],
            lat["direct-same-node"]["p50_us"],
        ),
        "cpu_per_gb": _ratio("cpu_per_gb", cpu["mesh/per_gb"], cpu["stunnel/per_gb"]),
        "cpu_per_1000_connections": _ratio(
            "cpu_per_1000_connections",
            cpu["mesh/per_1000_connections"],
            cpu["stunnel/per_1000_connections"],
        ),
        "ztunnel_rss_10k_connections": _ratio(
            "ztunnel_rss_10k_connections", max(rss["during_mb"].values()), None
        ),
    }
    units = {
        "throughput_1_stream": "Gbit/s (baseline: stunnel)",
        "throughput_4_streams": "Gbit/s (baseline: stunnel)",
        "new_connections_per_s": "connections/s (baseline: stunnel)",
        "latency_p50": "microseconds (baseline: stunnel)",
        "latency_p99": "microseconds (baseline: stunnel)",
        "same_node_throughput": "Gbit/s (baseline: direct same-node)",
        "same_node_latency_p50": "microseconds (baseline: direct same-node)",
        "cpu_per_gb": "CPU seconds per GB, both ztunnels (baseline: both stunnels)",
        "cpu_per_1000_connections": "CPU seconds per 1,000 connections (baseline: stunnels)",
        "ztunnel_rss_10k_connections": f"MB, largest ztunnel (all its processes), {opened} connections held",
    }
    for name, unit in units.items():
        metrics[name]["unit"] = unit
    if opened < capped:
        notes.append(f"only {opened} of {capped} held connections opened")
    return {
        "benchmark": "mesh",
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "metrics": metrics,
        "direct": {
            "throughput_gbps": {k: v for k, v in t.items() if k.startswith("direct")},
            "latency_us": lat["direct"],
            "conns_per_s": cps["direct"],
        },
        "raw": raw,
        "notes": notes,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, writes the results, returns them (``perf.run`` calls this)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m perf.bench_mesh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=10_000, help="held for the RSS metric")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput/cps run")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; medians count")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--steering",
        choices=["ebpf", "tproxy", "both"],
        default="both",
        help="how pods are steered into the ztunnel: the agent's eBPF programs (results "
        "'mesh'), nftables TPROXY (results 'mesh-tproxy'), or both, side by side",
    )
    args = parser.parse_args(args_list)
    if os.geteuid() != 0:
        raise SystemExit("bench_mesh builds network namespaces: run it as root")
    steerings = ["ebpf", "tproxy"] if args.steering == "both" else [args.steering]
    results: dict[str, dict[str, Any]] = {}
    for steering in steerings:
        with tempfile.TemporaryDirectory(prefix="veil-bench-mesh-") as tmp:
            result = run_bench(args.connections, args.seconds, args.rounds, Path(tmp), steering)
        result["steering"] = steering
        write_outputs(result, args.results, "mesh" if steering == "ebpf" else "mesh-tproxy")
        print(f"\n== steering: {steering}")
        print_table(result)
        results[steering] = result
    if len(results) > 1:
        print_side_by_side(results)
    return results["ebpf"] if "ebpf" in results else results[steerings[0]]


if __name__ == "__main__":
    main()
