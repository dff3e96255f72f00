"""Same-node fast path: the Python relay against two kernel splices, with direct as baseline.

Everything runs on loopback inside a network namespace this benchmark
creates (and removes). Seven ways for a client socket to reach a server socket:

* **direct**: client -> server, no proxy;
* **relay**: client -> proxy -> server, the ztunnel's own Python relay
  (:func:`ztunnel.proxy.relay.relay_sockets`) in a separate process;
* **splice2**: the same proxy, relaying with splice(2) through a pipe per
  direction (:func:`ztunnel.proxy.pipes.pipe_relay`) from the first byte,
  with the ztunnel's fixed same-node socket buffers;
* **sk_skb**: the same proxy sockets, spliced by the ztunnel's real fast path
  (:class:`ztunnel.proxy.splice.SameNodeSplice` on pins made by
  :func:`agent.bpf.splice.ensure_splice`): received bytes are redirected out
  of the other proxy socket in the kernel;
* **auto**: the ztunnel's ``--same-node-splice auto``
  (:meth:`ztunnel.proxy.splice.SameNodeSplice.relay_then_splice`): the relay
  first, the sk_skb splice once the connection turns out interactive (the RR
  sample is promoted during its warm-up; the bulk stream moves to the
  splice(2) relay after its first MiB);
* **auto_relay**: ``auto`` as it was before the splice(2) relay (bulk stays on
  the Python relay), kept so the two are compared in the same run;
* **sk_msg**: the Cilium/Merbridge shape (ebpf/splice_msg.bpf.c): the client's
  and server's OWN sockets in a sockhash, every sendmsg() moved into the
  peer's receive queue (BPF_F_INGRESS), no TCP and no proxy socket at all.
  A node proxy does not own those sockets, so this is the ceiling, not an
  option the ztunnel has as built.

Per case and round: 64-byte request/response p50 (and p99) over one
connection, and bulk throughput (one stream, 256 KiB writes, ``--seconds``).
Client, proxy and server are separate processes (fork), as pods and the
ztunnel are. Results go to ``perf/results/splice.json``.

Run (root): ``.venv/bin/python -m perf.bench_splice [--rounds R] [--count N] [--seconds S]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.bpf.pins import PinLayout, ensure_bpffs
from agent.bpf.programs import DEFAULT_EBPF_DIR
from agent.bpf.splice import ensure_splice, splice_cflags
from lab.netns import create_netns, in_netns, remove_netns
from node import bpf
from ztunnel.proxy.connections import ConnectionInfo, Direction, LiveConnection
from ztunnel.proxy.pipes import pipe_relay
from ztunnel.proxy.relay import relay_sockets
from ztunnel.proxy.sockets import Address, size_same_node_buffers
from ztunnel.proxy.splice import SameNodeSplice

__all__ = ["CASES", "main"]

CASES = ("direct", "relay", "splice2", "sk_skb", "auto", "auto_relay", "sk_msg")
_PROXIED = ("relay", "splice2", "sk_skb", "auto", "auto_relay")
RESULTS = Path(__file__).resolve().parent / "results" / "splice.json"
_MSG = 64
_BULK = 256 * 1024


class _MsgSplice:
    """The sk_msg alternative, compiled with bcc for this benchmark only."""

    def __init__(self) -> None:
        from bcc import BPF, BPFAttachType, lib

        path = DEFAULT_EBPF_DIR / "splice_msg.bpf.c"
        self._module = BPF(
            text=path.read_text().encode(), cflags=list(splice_cflags(DEFAULT_EBPF_DIR))
        )
        fn = self._module.load_func(b"veil_splice_msg", BPF.SK_MSG)
        self.socks = int(lib.bpf_table_fd(self._module.module, b"msg_socks"))
        self.peers = int(lib.bpf_table_fd(self._module.module, b"msg_peers"))
        BPF.attach_func(fn, self.socks, BPFAttachType.SK_MSG_VERDICT)

    @staticmethod
    def key(sock: socket.socket) -> bytes:
        local = sock.getsockname()[1]
        remote = socket.htons(sock.getpeername()[1])
        return struct.pack("=Q", (local << 32) | remote)

    def splice(self, a: socket.socket, b: socket.socket) -> None:
        ka, kb = self.key(a), self.key(b)
        peer = struct.Struct(bpf.SPLICE_PEER_FORMAT)
        bpf.map_update(self.peers, ka, peer.pack(int.from_bytes(kb, "little"), 0))
        bpf.map_update(self.peers, kb, peer.pack(int.from_bytes(ka, "little"), 0))
        bpf.map_update(self.socks, ka, struct.pack("i", a.fileno()))
        bpf.map_update(self.socks, kb, struct.pack("i", b.fileno()))

    def close(self) -> None:
        self._module.cleanup()


def _pair(
    netns: str, proxied: bool
) -> tuple[socket.socket, socket.socket, tuple[socket.socket, socket.socket] | None]:
    with in_netns(netns):
        server_l = socket.create_server(("127.0.0.1", 0))
        proxy_l = socket.create_server(("127.0.0.1", 0))
        try:
            if not proxied:
                c = socket.create_connection(server_l.getsockname())
                s, _ = server_l.accept()
                middle = None
            else:
                c = socket.create_connection(proxy_l.getsockname())
                a, _ = proxy_l.accept()
                b = socket.create_connection(server_l.getsockname())
                s, _ = server_l.accept()
                middle = (a, b)
        finally:
            server_l.close()
            proxy_l.close()
    for sock in (c, s, *(middle or ())):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c, s, middle


def _proxy(case: str, a: socket.socket, b: socket.socket, pin_dir: Path) -> None:
    a.setblocking(False)
    b.setblocking(False)

    async def run() -> None:
        if case == "relay":
            await relay_sockets(a, b)
            return
        if case == "splice2":
            size_same_node_buffers(a, b)  # as the ztunnel does for it
            if await pipe_relay(a, b) is None:
                raise SystemExit("no pipes for the splice(2) relay")
            return
        info = ConnectionInfo(
            Direction.OUTBOUND, Address("127.0.0.1", 1), Address("127.0.0.1", 2), "same_node"
        )
        conn = LiveConnection(id=1, info=info, authz=None)
        if case in ("auto", "auto_relay"):
            fast = SameNodeSplice(pin_dir, promote=True, bulk_pipe=case == "auto")
            await fast.relay_then_splice(a, b, conn)
            return
        result = await SameNodeSplice(pin_dir).relay(a, b, conn)
        if result is None:
            raise SystemExit("the splice fell back to the Python relay")

    asyncio.run(run())


def _serve(mode: str, s: socket.socket, out: int) -> None:
    total = 0
    buf = bytearray(1 << 20)
    while n := s.recv_into(buf):
        total += n
        if mode == "rr":
            s.sendall(memoryview(buf)[:n])
    os.write(out, f"{total} {time.perf_counter()}".encode())


def _rr(c: socket.socket, count: int) -> dict[str, float]:
    msg = b"r" * _MSG
    samples = []
    for i in range(count + 200):
        start = time.perf_counter_ns()
        c.sendall(msg)
        got = 0
        while got < _MSG:
            data = c.recv(_MSG - got)
            if not data:
                raise ConnectionError("server closed during the round trips")
            got += len(data)
        if i >= 200:  # warm-up
            samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return {"p50_us": statistics.median(samples), "p99_us": samples[int(len(samples) * 0.99) - 1]}


def _bulk(c: socket.socket, seconds: float) -> tuple[float, int]:
    block = os.urandom(_BULK)
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        c.sendall(block)
        sent += _BULK
    return start, sent


def measure(
    case: str,
    mode: str,
    netns: str,
    pin_dir: Path,
    msg: _MsgSplice | None,
    args: argparse.Namespace,
) -> dict[str, float]:
    c, s, middle = _pair(netns, proxied=case in _PROXIED)
    if case == "sk_msg":
        assert msg is not None
        msg.splice(c, s)
    children = []
    if middle is not None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                c.close()
                s.close()
                _proxy(case, middle[0], middle[1], pin_dir)
            except BaseException as e:
                print(f"proxy ({case}): {e}", file=sys.stderr)
                code = 1
            os._exit(code)
        children.append(pid)
        for sock in middle:
            sock.close()
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(rd)
            c.close()
            _serve(mode, s, wr)
        except BaseException as e:
            print(f"server ({case}): {e}", file=sys.stderr)
            code = 1
        os._exit(code)
    children.append(pid)
    os.close(wr)
    s.close()
    try:
        if mode == "rr":
            result = _rr(c, args.count)
            c.shutdown(socket.SHUT_WR)
            os.read(rd, 100)  # the server saw EOF
        else:
            start, sent = _bulk(c, args.seconds)
            c.shutdown(socket.SHUT_WR)
            total_s, end_s = os.read(rd, 100).decode().split()
            total, end = int(total_s), float(end_s)
            if total != sent:
                raise AssertionError(f"{case}: sent {sent} bytes, the server got {total}")
            result = {"gbit_s": total * 8 / (end - start) / 1e9}
    finally:
        c.close()
        os.close(rd)
        proxy_cpu = 0.0
        for child in children:
            _, status, usage = os.wait4(child, 0)
            if status != 0:
                raise RuntimeError(f"{case} {mode}: a helper process failed ({status})")
            if middle is not None and child == children[0]:
                proxy_cpu = usage.ru_utime + usage.ru_stime
    if middle is not None and mode == "bulk":
        # CPU the proxy process spent per GB carried: robust to a noisy machine
        # where the throughput figures are not.
        result["proxy_cpu_s_per_gb"] = proxy_cpu / (total / 1e9)
    return result


@contextlib.contextmanager
def _environment() -> Iterator[tuple[str, Path, _MsgSplice]]:
    netns = f"veil-splice-{os.getpid()}"
    pin_dir = Path(f"/sys/fs/bpf/veil/bench-splice-{os.getpid()}")
    root_existed = pin_dir.parent.exists()
    create_netns(netns)
    msg: _MsgSplice | None = None
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        ensure_bpffs(pin_dir)
        pin_dir.mkdir(parents=True, exist_ok=True)
        ensure_splice(PinLayout(pin_dir))
        msg = _MsgSplice()
        yield netns, pin_dir, msg
    finally:
        if msg is not None:
            msg.close()
        shutil.rmtree(pin_dir, ignore_errors=True)
        if not root_existed:
            with contextlib.suppress(OSError):
                pin_dir.parent.rmdir()
        remove_netns(netns)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the report (perf.run's convention) and writes it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=5000, help="round trips per RR sample")
    parser.add_argument("--seconds", type=float, default=2.0, help="bulk seconds per sample")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    raw: dict[str, list[dict[str, float]]] = {f"{c}/{m}": [] for c in CASES for m in ("rr", "bulk")}
    # SIGTERM (a timeout) unwinds like Ctrl-C, so the namespace and pins are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with _environment() as (netns, pin_dir, msg):
        for _ in range(args.rounds):
            for case in CASES:  # interleaved: drift on a shared machine hits every case alike
                for mode in ("rr", "bulk"):
                    raw[f"{case}/{mode}"].append(measure(case, mode, netns, pin_dir, msg, args))
    summary: dict[str, Any] = {}
    for case in CASES:
        rr, bulk = raw[f"{case}/rr"], raw[f"{case}/bulk"]
        summary[case] = {
            "p50_us": round(statistics.median(r["p50_us"] for r in rr), 1),
            "p99_us": round(statistics.median(r["p99_us"] for r in rr), 1),
            "gbit_s": round(statistics.median(r["gbit_s"] for r in bulk), 2),
        }
        if case in _PROXIED:
            summary[case]["proxy_cpu_s_per_gb"] = round(
                statistics.median(r["proxy_cpu_s_per_gb"] for r in bulk), 3
            )
    direct = summary["direct"]
    for case in CASES:
        summary[case]["p50_vs_direct"] = round(summary[case]["p50_us"] / direct["p50_us"], 2)
        summary[case]["gbit_vs_direct"] = round(summary[case]["gbit_s"] / direct["gbit_s"], 2)
    fast = summary["auto"]
    metrics = {
        "same-node p50 vs direct (ztunnel: auto)": {
            "ratio": fast["p50_vs_direct"], "target": "<= 1.2", "pass": fast["p50_vs_direct"] <= 1.2,
        },
        "same-node throughput vs direct (ztunnel: auto)": {
            "ratio": fast["gbit_vs_direct"], "target": ">= 0.8",
            "pass": fast["gbit_vs_direct"] >= 0.8,
        },
        "same-node p50 vs direct (sk_skb splice, always)": {
            "ratio": summary["sk_skb"]["p50_vs_direct"],
        },
        "same-node throughput vs direct (sk_skb splice, always)": {
            "ratio": summary["sk_skb"]["gbit_vs_direct"],
        },
        "same-node p50 vs direct (Python relay)": {"ratio": summary["relay"]["p50_vs_direct"]},
        "same-node throughput vs direct (splice(2) relay)": {
            "ratio": summary["splice2"]["gbit_vs_direct"],
        },
        "same-node throughput vs direct (auto, bulk on the Python relay)": {
            "ratio": summary["auto_relay"]["gbit_vs_direct"],
        },
        "same-node throughput vs direct (Python relay)": {
            "ratio": summary["relay"]["gbit_vs_direct"],
        },
        "same-node p50 vs direct (sk_msg, app sockets)": {
            "ratio": summary["sk_msg"]["p50_vs_direct"],
        },
        "same-node throughput vs direct (sk_msg, app sockets)": {
            "ratio": summary["sk_msg"]["gbit_vs_direct"],
        },
    }  # fmt: skip
    report = {
        "metrics": metrics,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nproc": os.cpu_count(),
        "kernel": os.uname().release,
        "args": {"rounds": args.rounds, "count": args.count, "seconds": args.seconds},
        "summary": summary,
        "raw": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'case':10} {'p50 us':>8} {'p99 us':>8} {'Gbit/s':>8} {'p50/direct':>11} {'Gbit/direct':>12} {'proxy CPU s/GB':>15}"
    )
    for case in CASES:
        r = summary[case]
        print(
            f"{case:10} {r['p50_us']:8.1f} {r['p99_us']:8.1f} {r['gbit_s']:8.2f} {r['p50_vs_direct']:11.2f} {r['gbit_vs_direct']:12.2f} {r.get('proxy_cpu_s_per_gb', 0):15.3f}"
        )
    print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(m.get("pass", True) for m in result["metrics"].values()) else 1)
