"""HBONE data-path throughput on loopback, against a plain TLS relay, in one run.

Topology (each proxy is its own process on uvloop; sender and sink are blocking
threads in this process, so they cost kernel time, not Python time):

    sender --TCP--> client proxy ==(TLS 1.3 mTLS)==> server proxy --TCP--> sink

* ``hbone``: the client proxy opens an HBONE stream per accepted connection
  through :class:`ztunnel.hbone.HboneClientPool`; the server proxy is a
  :class:`ztunnel.hbone.HboneServer` whose handler dials the sink.
* ``tls``: the baseline - the same two processes relay each TCP connection over
  its own TLS connection (same contexts: TLS 1.3, ALPN h2, mutual auth) with a
  tuned BufferedProtocol relay (256 KiB reads), no HTTP/2.

Each case moves ``--mib`` MiB in total, on one stream and spread over 4 streams,
the two modes alternating ``--rounds`` times. Reported per case: the median and the
best round of each mode, and the proxies' CPU efficiency (Gbit moved per CPU
second of both proxy processes), which is far less sensitive than wall-clock
throughput to other load on a shared host. Results go to
``perf/results/hbone.json``.

Run: ``.venv/bin/python perf/bench_hbone.py [--mib 512] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import psutil
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from ztunnel.hbone import (
    HboneClientPool,
    HboneConfig,
    HboneServer,
    InboundStream,
    default_connect,
    relay,
)
from ztunnel.hbone.buffers import shared_buffer
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.tls import TlsContextCache

TD = "cluster.local"
CLIENT = SpiffeId(TD, "/ns/bench/sa/client")
SERVER = SpiffeId(TD, "/ns/bench/sa/server")
CHUNK = 1 << 20
READ = 256 * 1024
RESULTS = Path(__file__).resolve().parent / "results" / "hbone.json"


# ------------------------------------------------------------------ PKI


def make_pki() -> tuple[bytes, WorkloadCertificate, WorkloadCertificate]:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench root")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(identity: SpiffeId) -> WorkloadCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), True
            )
            .sign(ca_key, hashes.SHA256())
        )
        return WorkloadCertificate(
            identity=identity,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            chain_pem=(cert.public_bytes(serialization.Encoding.PEM),),
            not_before=now - timedelta(minutes=5),
            not_after=now + timedelta(hours=2),
            serial=cert.serial_number,
        )

    return ca.public_bytes(serialization.Encoding.PEM), leaf(CLIENT), leaf(SERVER)


# ------------------------------------------------------- baseline relay


class _Half(asyncio.BufferedProtocol):
    """One side of the plain TLS relay: reads 256 KiB, writes to the other side."""

    def __init__(self) -> None:
        self.peer: _Half | None = None
        self.transport: asyncio.Transport | None = None
        self.buf = shared_buffer(READ)
        self.view: memoryview | None = None
        self.early: list[bytes] = []  # read before the other side connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        assert self.peer is not None
        if self.peer.early:
            self.transport.writelines(self.peer.early)
            self.peer.early.clear()

    def get_buffer(self, sizehint: int) -> memoryview:
        self.view = self.buf.view()
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        assert self.view is not None and self.peer is not None
        data = self.view[:nbytes]
        self.view = None
        t = self.peer.transport
        if t is None:
            self.early.append(bytes(data))
            return
        # Zero copy, as in the HBONE path: the shared buffer is replaced when the
        # transport keeps a slice (ztunnel.hbone.buffers).
        t.write(bytes(data) if t.get_write_buffer_size() else data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            if self.peer.transport.can_write_eof():
                self.peer.transport.write_eof()
            else:
                self.peer.transport.close()
        # Half-close on TCP; a TLS transport closes on EOF whatever we answer.
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def _pair(loop: asyncio.AbstractEventLoop, a_sock: socket.socket, b_connect: Any) -> None:
    a, b = _Half(), _Half()
    a.peer, b.peer = b, a
    await loop.connect_accepted_socket(lambda: a, a_sock)
    await b_connect(lambda: b)


# ------------------------------------------------------------ processes


def _serve(fn: Any, lsock: socket.socket) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock.setblocking(False)
        tasks: set[asyncio.Task[Any]] = set()
        while True:
            conn, _ = await loop.sock_accept(lsock)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(fn(loop, conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    uvloop.run(main())


def client_proxy(
    mode: str, lsock: socket.socket, server_port: int, root: bytes, cert: WorkloadCertificate
) -> None:
    bundle = TrustBundle(TD, (root,))
    state: dict[str, Any] = {}

    async def handle(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        if mode == "hbone":
            pool = state.setdefault("pool", HboneClientPool(lambda: bundle, config=HboneConfig()))
            stream = await pool.open_stream(
                cert, "127.0.0.1", server_port, SERVER, "127.0.0.1:1", None
            )
            await relay(stream, conn)
        else:
            ctx = state.setdefault("ctx", TlsContextCache().client(cert, bundle))
            await _pair(
                loop,
                conn,
                lambda f: loop.create_connection(
                    f, "127.0.0.1", server_port, ssl=ctx, server_hostname=""
                ),
            )

    _serve(handle, lsock)


def server_proxy(
    mode: str, lsock: socket.socket, sink_port: int, root: bytes, cert: WorkloadCertificate
) -> None:
    bundle = TrustBundle(TD, (root,))

    async def inbound(stream: InboundStream) -> None:
        await relay(stream, await default_connect("127.0.0.1", sink_port))

    state: dict[str, Any] = {}

    async def handle(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        if mode == "hbone":
            server = state.setdefault(
                "server", HboneServer(lambda ip: cert, lambda: bundle, inbound)
            )
            await server.serve_connection(conn)
        else:
            ctx = state.setdefault("ctx", TlsContextCache().server(cert, bundle))
            a, b = _Half(), _Half()
            a.peer, b.peer = b, a
            await loop.connect_accepted_socket(lambda: a, conn, ssl=ctx)
            await loop.create_connection(lambda: b, "127.0.0.1", sink_port)

    _serve(handle, lsock)


# ------------------------------------------------------ sender and sink


def run_case(proxy_port: int, sink: socket.socket, streams: int, nbytes: int) -> float:
    """Send ``nbytes`` on each of ``streams`` connections; seconds until the sink has all."""
    received = [0] * streams
    done = threading.Barrier(streams + 1)
    payload = os.urandom(CHUNK)

    def drain(i: int) -> None:
        conn, _ = sink.accept()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := conn.recv_into(view):
            received[i] += n
        conn.close()
        done.wait()

    def send() -> None:
        s = socket.create_connection(("127.0.0.1", proxy_port))
        left = nbytes
        while left > 0:
            s.sendall(payload[: min(CHUNK, left)])
            left -= CHUNK
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        s.close()

    threads = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    senders = [threading.Thread(target=send, daemon=True) for _ in range(streams)]
    for t in senders:
        t.start()
    done.wait(timeout=300)
    elapsed = time.perf_counter() - start
    if sum(received) != streams * nbytes:
        raise RuntimeError(f"sink got {sum(received)} bytes, expected {streams * nbytes}")
    for t in senders:
        t.join(10)
    return elapsed


def listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


@dataclass(frozen=True)
class Sample:
    seconds: float  # wall clock until the sink had every byte
    cpu: float  # CPU seconds both proxy processes used meanwhile
    total_bytes: int

    @property
    def gbps(self) -> float:
        return self.total_bytes * 8 / self.seconds / 1e9

    @property
    def gbit_per_cpu_second(self) -> float:
        return self.total_bytes * 8 / self.cpu / 1e9


def _cpu(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def bench_mode(
    mode: str,
    pki: tuple[bytes, WorkloadCertificate, WorkloadCertificate],
    cases: list[tuple[int, int]],
) -> list[Sample]:
    root, ccert, scert = pki
    sink, server_l, client_l = listener(), listener(), listener()
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(
            target=server_proxy,
            args=(mode, server_l, sink.getsockname()[1], root, scert),
            daemon=True,
        ),
        ctx.Process(
            target=client_proxy,
            args=(mode, client_l, server_l.getsockname()[1], root, ccert),
            daemon=True,
        ),
    ]
    for p in procs:
        p.start()
    watched = [psutil.Process(p.pid) for p in procs if p.pid is not None]
    try:
        samples = []
        for streams, nbytes in cases:
            before = _cpu(watched)
            seconds = run_case(client_l.getsockname()[1], sink, streams, nbytes)
            samples.append(Sample(seconds, _cpu(watched) - before, streams * nbytes))
        return samples
    finally:
        for p in procs:
            p.terminate()
            p.join(5)
        for s in (sink, server_l, client_l):
            s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB per case (default 512)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per mode")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    pki = make_pki()
    nbytes = args.mib << 20
    cases = [(1, nbytes), (4, nbytes // 4)]  # the same volume, on 1 and on 4 streams
    runs: dict[str, list[list[Sample]]] = {"tls": [], "hbone": []}
    for rnd in range(args.rounds):
        for mode in ("tls", "hbone"):
            samples = bench_mode(mode, pki, cases)
            runs[mode].append(samples)
            line = ", ".join(
                f"{streams} stream{'s' if streams > 1 else ''} {x.gbps:.2f} Gbit/s "
                f"({x.gbit_per_cpu_second:.2f} Gbit/cpu-s)"
                for (streams, _), x in zip(cases, samples, strict=True)
            )
            print(f"round {rnd + 1} {mode:5}: {line}", flush=True)
    result: dict[str, Any] = {
        "benchmark": "hbone",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        },
        "mib_per_case": args.mib,
        "rounds": args.rounds,
        "method": "modes alternate each round; median and best over rounds; cpu = user+system "
        "seconds of both proxy processes during the case",
        "cases": {},
    }
    for i, (streams, _) in enumerate(cases):
        gbps = {m: [r[i].gbps for r in runs[m]] for m in runs}
        eff = {m: [r[i].gbit_per_cpu_second for r in runs[m]] for m in runs}
        med = {m: statistics.median(gbps[m]) for m in runs}
        med_eff = {m: statistics.median(eff[m]) for m in runs}
        result["cases"][f"{streams}_stream" + ("s" if streams > 1 else "")] = {
            "tls_relay_gbps_median": round(med["tls"], 3),
            "hbone_gbps_median": round(med["hbone"], 3),
            "throughput_ratio_median": round(med["hbone"] / med["tls"], 3),
            "tls_relay_gbps_best": round(max(gbps["tls"]), 3),
            "hbone_gbps_best": round(max(gbps["hbone"]), 3),
            "throughput_ratio_best": round(max(gbps["hbone"]) / max(gbps["tls"]), 3),
            "tls_relay_gbit_per_cpu_second_median": round(med_eff["tls"], 3),
            "hbone_gbit_per_cpu_second_median": round(med_eff["hbone"], 3),
            "cpu_efficiency_ratio_median": round(med_eff["hbone"] / med_eff["tls"], 3),
            "rounds_gbps": {m: [round(x, 3) for x in gbps[m]] for m in runs},
            "rounds_gbit_per_cpu_second": {m: [round(x, 3) for x in eff[m]] for m in runs},
        }
        print(
            f"{streams} stream(s), median of {args.rounds}: tls {med['tls']:.2f} Gbit/s, hbone "
            f"{med['hbone']:.2f} Gbit/s (x{med['hbone'] / med['tls']:.2f}); per CPU-second: tls "
            f"{med_eff['tls']:.2f}, hbone {med_eff['hbone']:.2f} Gbit "
            f"(x{med_eff['hbone'] / med_eff['tls']:.2f})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
