"""The programs the mesh benchmark runs inside pod namespaces.

``python -m perf.mesh_workers ROLE ARGS...`` with ROLE one of ``echo-server PORT``,
``rr-client HOST PORT COUNT SIZE`` (request/response latency), ``cps-client HOST
PORT SECONDS PARALLEL`` (new connections per second) and ``hold-client HOST
PORT COUNT`` (holds connections open until stdin closes). Clients print one
JSON line with their figures.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["worker"]


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _echo_server(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "0.0.0.0", port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def _rr_client(host: str, port: int, count: int, size: int) -> dict[str, float]:
    msg = b"r" * size
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples: list[float] = []
        for i in range(count + 100):
            start = time.perf_counter_ns()
            s.sendall(msg)
            got = 0
            while got < size:
                chunk = s.recv(size - got)
                if not chunk:
                    raise ConnectionError("echo server closed the connection")
                got += len(chunk)
            if i >= 100:  # the first 100 warm up caches and windows
                samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[int(len(samples) * 0.99)],
        "mean_us": statistics.fmean(samples),
    }


async def _cps_client(host: str, port: int, seconds: float, parallel: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    done = 0
    failed = 0
    stop_at = loop.time() + seconds

    async def one_worker() -> None:
        nonlocal done, failed
        while loop.time() < stop_at:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (host, port))
                await loop.sock_sendall(sock, b"x")
                if await loop.sock_recv(sock, 1) == b"x":
                    done += 1
                else:
                    failed += 1
            except OSError:
                failed += 1
            finally:
                sock.close()

    start = loop.time()
    await asyncio.gather(*(one_worker() for _ in range(parallel)))
    return {"conns_per_s": done / (loop.time() - start), "failed": failed}


async def _hold_client(host: str, port: int, count: int) -> None:
    """Opens ``count`` echoed connections, reports, holds them until stdin closes."""
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    failed = 0
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        nonlocal failed
        async with sem:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 30)
                await loop.sock_sendall(sock, b"h")
                if await asyncio.wait_for(loop.sock_recv(sock, 1), 30) != b"h":
                    raise ConnectionError("no echo")
                held.append(sock)
            except (OSError, TimeoutError):
                failed += 1
                sock.close()

    start = loop.time()
    await asyncio.gather(*(one() for _ in range(count)))
    print(json.dumps({"opened": len(held), "failed": failed, "seconds": loop.time() - start}))
    sys.stdout.flush()
    await loop.run_in_executor(None, sys.stdin.read)
    for s in held:
        s.close()


def worker(argv: Sequence[str]) -> int:
    import uvloop

    role, *rest = argv
    if role == "echo-server":
        uvloop.run(_echo_server(int(rest[0])))
    elif role == "rr-client":
        print(json.dumps(_rr_client(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))))
    elif role == "cps-client":
        result = uvloop.run(_cps_client(rest[0], int(rest[1]), float(rest[2]), int(rest[3])))
        print(json.dumps(result))
    elif role == "hold-client":
        uvloop.run(_hold_client(rest[0], int(rest[1]), int(rest[2])))
    else:
        print(f"unknown worker role {role!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
