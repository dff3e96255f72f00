"""The waypoint against HAProxy: HTTP/1.1 keep-alive requests/s, p50 and p99, one run.

Both run in the netns lab built from ``examples/registry.yaml`` (root), with
the same client, the same request (``GET /pay`` with a valid ES256 JWT) and
the same kind of backend app, alternating rounds:

* ``waypoint``: h2load in checkout's pod -> payments-api VIP -> eBPF -> node-a
  ztunnel -> HBONE (mTLS) -> the waypoint (own pod, own process: HTTP/1.1
  parsing, JWT verification, AuthorizationPolicy with a path rule) -> HBONE
  -> node-b ztunnel -> payments' HTTP app.
* ``haproxy``: Debian's HAProxy 2.6, one thread, in the same waypoint pod:
  h2load in checkout's pod -> TLS -> eBPF -> node-a ztunnel (passthrough: the
  waypoint pod is not enrolled) -> HAProxy (TLS in, ``jwt_verify`` ES256 plus
  iss/aud/exp checks, path ACL) -> TLS out -> stunnel in batch's pod (node-b,
  the TLS terminator a destination without Veil would have) -> the same
  HTTP app.

The client is h2load (C, ``--h1``, one thread); percentiles come from its
per-request log. Each round has two phases per proxy:

* **latency**: one keep-alive connection, one request at a time, so p50 and
  p99 are what one request costs on the path;
* **throughput**: ``--connections`` keep-alive connections back to back, so
  requests/s is the path's capacity. Its percentiles are reported too, but in
  a closed loop they are queueing (about connections / requests-per-second),
  not request cost: a proxy at 0.4x the other's capacity shows about 2.5x its
  p50 there whatever one request costs.

The waypoint's RSS is read from /proc after the runs. Targets (issue 10):
waypoint req/s >= 0.3x HAProxy's (throughput phase), p50 <= 2x HAProxy's
(latency phase). Results:
``perf/results/waypoint.json`` (via ``python -m perf.run waypoint``, or run
this file directly).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lab.demo import DEFAULT_REGISTRY
from lab.demo_waypoint import AUDIENCE, ISSUER, L7_APP_PORT, L7Demo
from lab.mesh import LabMesh

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
HAPROXY_PORT = 8443
STUNNEL_PORT = 8443
TARGET_RPS_RATIO = 0.3
TARGET_P50_RATIO = 2.0


def _pki(work: Path, names: list[str]) -> Path:
    """A throwaway CA and one server certificate per name (PEM cert+key files)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (work / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = work / f"{name}.pem"
        path.write_bytes(pem)
        path.chmod(0o600)
    return work / "ca.pem"


def _haproxy_config(work: Path, listen: str, backend: str, pubkey: Path) -> Path:
    cfg = f"""global
    nbthread 1
    maxconn 4096
    tune.ssl.default-dh-param 2048

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always

frontend fe
    bind {listen}:{HAPROXY_PORT} ssl crt {work / "haproxy.pem"} alpn http/1.1
    http-request set-var(txn.now) date
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request deny deny_status 401 unless {{ var(txn.alg) -m str ES256 }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{pubkey}") -m int 1 }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.iss') -m str {ISSUER} }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.aud') -m str {AUDIENCE} }}
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}
    http-request deny deny_status 403 unless {{ method GET }} {{ path /pay }} || {{ method GET }} {{ path_beg /pay/ }}
    default_backend be

backend be
    server app {backend}:{STUNNEL_PORT} ssl verify required ca-file {work / "ca.pem"} sni str(backend) alpn http/1.1
"""
    path = work / "haproxy.cfg"
    path.write_text(cfg)
    return path


def _stunnel_config(work: Path, listen: str) -> Path:
    cfg = f"""foreground = yes
pid =
[backend]
accept = {listen}:{STUNNEL_PORT}
connect = 127.0.0.1:{L7_APP_PORT}
cert = {work / "backend.pem"}
"""
    path = work / "stunnel.conf"
    path.write_text(cfg)
    return path


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def _h2load(
    mesh: LabMesh, url: str, token: str, seconds: int, conns: int, log: Path
) -> dict[str, Any]:
    argv = [
        "h2load", "--h1", "-t", "1", "-c", str(conns), "-D", str(seconds),
        "--warm-up-time", "1", "-H", f"Authorization: Bearer {token}",
        f"--log-file={log}", url,
    ]  # fmt: skip
    done = mesh.topo.run(mesh.pod("checkout").lab, argv, timeout=seconds + 60)
    text = done.stdout.decode()
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    ok = [int(r[2]) / 1000.0 for r in rows if r[1] == "200"]
    codes: dict[str, int] = {}
    for r in rows:
        codes[r[1]] = codes.get(r[1], 0) + 1
    rps = len(ok) / seconds
    return {
        "requests_per_s": round(rps, 1),
        "p50_ms": round(_percentile(ok, 0.50), 3),
        "p99_ms": round(_percentile(ok, 0.99), 3),
        "status_counts": codes,
        "h2load_summary": [
            ln
            for ln in text.splitlines()
            if ln.startswith(("finished", "requests:", "status codes:"))
        ],
    }


def _rss_mib(pid: int) -> float:
    """The largest RSS in ``pid``'s process tree (the wrapper that enters the
    namespace is tiny; the waypoint itself is the big one)."""
    proc = psutil.Process(pid)
    tree = [proc, *proc.children(recursive=True)]
    return round(max(p.memory_info().rss for p in tree) / (1 << 20), 1)


def run(seconds: int, rounds: int, conns: int) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("bench_waypoint builds network namespaces: run as root")
    for tool in ("haproxy", "stunnel4", "h2load"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run scripts/setup.sh (apt-get install haproxy)")
    with LabMesh(DEFAULT_REGISTRY, log_level="warning") as mesh:
        l7 = L7Demo.prepare(mesh)
        if l7 is None:
            raise SystemExit("examples/registry.yaml declares no waypoint")
        mesh.start()
        l7.start()
        waypoint = mesh.pod(l7.pod)
        batch = mesh.pod("batch")
        work = mesh.workdir / "bench"
        work.mkdir()
        _pki(work, ["haproxy", "backend"])
        pub = work / "jwt-pub.pem"
        pub.write_bytes(
            l7.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        mesh.topo.start_app(batch.lab, "http", L7_APP_PORT, log_path=work / "batch-http.log")
        stunnel = mesh.topo.popen(
            batch.lab, ["stunnel4", str(_stunnel_config(work, batch.ip))],
            log_path=work / "stunnel.log",
        )  # fmt: skip
        cfg = _haproxy_config(work, waypoint.ip, batch.ip, pub)
        subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], check=True)
        haproxy = mesh.topo.popen(
            waypoint.lab, ["haproxy", "-db", "-f", str(cfg)], log_path=work / "haproxy.log"
        )
        time.sleep(1.0)
        for proc, what in ((stunnel, "stunnel"), (haproxy, "haproxy")):
            if proc.poll() is not None:
                raise SystemExit(f"{what} exited: {proc.log_text()[-2000:]}")
        token = l7.token(exp=int(time.time()) + 3600)
        urls = {
            "waypoint": f"http://{l7.service_vip}:{l7.service_port}/pay",
            "haproxy": f"https://{waypoint.ip}:{HAPROXY_PORT}/pay",
        }
        samples: dict[str, list[dict[str, Any]]] = {
            f"{mode}/{phase}": [] for mode in urls for phase in ("latency", "throughput")
        }
        for i in range(rounds):
            order = ("waypoint", "haproxy") if i % 2 == 0 else ("haproxy", "waypoint")
            for mode in order:
                for phase, c in (("latency", 1), ("throughput", conns)):
                    log = work / f"{mode}-{phase}-{i}.log"
                    row = _h2load(mesh, urls[mode], token, seconds, c, log)
                    samples[f"{mode}/{phase}"].append(row)
                    print(f"round {i} {mode} {phase}: {row}", flush=True)
        rss = _rss_mib(mesh.waypoints[l7.pod].pid)
    return _result(samples, rss, seconds, rounds, conns)


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(float(r[key]) for r in rows)), 3)


def _result(
    samples: dict[str, list[dict[str, Any]]], rss: float, seconds: int, rounds: int, conns: int
) -> dict[str, Any]:
    wp_t, ha_t = samples["waypoint/throughput"], samples["haproxy/throughput"]
    wp_l, ha_l = samples["waypoint/latency"], samples["haproxy/latency"]
    rps_ratio = _median(wp_t, "requests_per_s") / max(_median(ha_t, "requests_per_s"), 1e-9)
    p50_ratio = _median(wp_l, "p50_ms") / max(_median(ha_l, "p50_ms"), 1e-9)
    return {
        "benchmark": "waypoint",
        "metric": "HTTP/1.1 keep-alive through the waypoint vs HAProxy 2.6 (TLS, jwt_verify, path ACL)",
        "metrics": {
            "requests_per_s_ratio": {
                "value": _median(wp_t, "requests_per_s"),
                "baseline": _median(ha_t, "requests_per_s"),
                "ratio": round(rps_ratio, 3),
                "target": f">= {TARGET_RPS_RATIO}x HAProxy",
                "pass": rps_ratio >= TARGET_RPS_RATIO,
                "unit": f"requests/s, {conns} keep-alive connections",
            },
            "p50_ratio": {
                "value": _median(wp_l, "p50_ms"),
                "baseline": _median(ha_l, "p50_ms"),
                "ratio": round(p50_ratio, 3),
                "target": f"<= {TARGET_P50_RATIO}x HAProxy",
                "pass": p50_ratio <= TARGET_P50_RATIO,
                "unit": "ms, one connection, one request at a time",
            },
            "p99_ms": {
                "value": _median(wp_l, "p99_ms"),
                "baseline": _median(ha_l, "p99_ms"),
                "target": "-",
                "pass": None,
                "unit": "ms, one connection, one request at a time",
            },
            "loaded_p50_ms": {
                "value": _median(wp_t, "p50_ms"),
                "baseline": _median(ha_t, "p50_ms"),
                "target": "-",
                "pass": None,
                "unit": f"ms, {conns} connections (closed loop: mostly queueing)",
            },
            "loaded_p99_ms": {
                "value": _median(wp_t, "p99_ms"),
                "baseline": _median(ha_t, "p99_ms"),
                "target": "-",
                "pass": None,
                "unit": f"ms, {conns} connections (closed loop: mostly queueing)",
            },
            "waypoint_rss_mib": {"value": rss, "target": "reported", "pass": None},
        },
        "rounds": samples,
        "seconds_per_round": seconds,
        "connections": conns,
        # The machine is shared: the 1-minute load average says how much.
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode, alternating")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    result = run(args.seconds, args.rounds, args.connections)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "waypoint.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main()["metrics"], indent=2))
