"""RSS plateaus across rounds of connections opened and closed (no leak, no creep).

Each round opens ``PER_ROUND`` HBONE connections to the real server, sends a
few bytes through a tunnel on each, and closes them all. The Python objects go
away; the native memory glibc keeps after a churn is what grew RSS round after
round, and what :mod:`ztunnel.hbone.heap` gives back.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket

import pytest

from controller.api.spiffe import SpiffeId
from ztunnel.hbone import CloseReason, HboneConfig, connect_hbone, relay
from ztunnel.tls import TlsContextCache

SERVER_ID = SpiffeId("cluster.local", "/ns/default/sa/server")
ROUNDS = 4
PER_ROUND = 400
CONCURRENT = 100
# Measured without the trim: +25..30 MiB per round of 400 at this point.
PLATEAU_SLACK_MIB = 12

pytestmark = pytest.mark.slow


@pytest.fixture
def hbone_config() -> HboneConfig:
    # One trim per round, after its last connection closed.
    return HboneConfig(heap_trim_after_closes=PER_ROUND, heap_trim_delay=0.3)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def one_tunnel(harness, cert, contexts, echo_port) -> None:  # type: ignore[no-untyped-def]
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", harness.port))
    conn = await connect_hbone(
        sock,
        contexts.client(cert, harness.ca.bundle()),
        expected_identity=SERVER_ID,
        trust_domain="cluster.local",
        config=harness.config,
    )
    try:
        stream = await conn.open_stream(("127.0.0.1", echo_port))
        ours, app = socket.socketpair()
        relaying = asyncio.get_running_loop().create_task(relay(stream, ours))
        reader, writer = await asyncio.open_connection(sock=app)
        writer.write(b"x" * 1000)
        await reader.readexactly(1000)
        writer.close()
        stream.close()
        await relaying
    finally:
        conn.terminate(CloseReason.CLOSED, "round done")
        await asyncio.wait_for(conn.closed, 10)


async def test_rss_plateaus_over_rounds_of_connections(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    contexts = TlsContextCache()
    gate = asyncio.Semaphore(CONCURRENT)

    async def gated() -> None:
        async with gate:
            await one_tunnel(harness, client_cert, contexts, echo_port)

    after: list[float] = []
    for _ in range(ROUNDS):
        await asyncio.gather(*(gated() for _ in range(PER_ROUND)))
        async with asyncio.timeout(10):
            while harness.server.connection_count:
                await asyncio.sleep(0.05)
        # The test harness remembers every stream; the ztunnel's handler does not.
        harness.policy.seen.clear()
        harness.policy.results.clear()
        gc.collect()
        await asyncio.sleep(harness.config.heap_trim_delay + 0.5)
        after.append(rss_mib())
    print("RSS after each round (MiB):", [round(x, 1) for x in after])
    # The first round warms caches and pools; from then on RSS must stay flat.
    assert after[-1] - after[1] < PLATEAU_SLACK_MIB, after
