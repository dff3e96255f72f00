"""WatchClient against the controller's real DiscoveryHub, in process (no gRPC).

``HubSource`` does what the Discovery servicer in controller.service does
for one stream (subscribe, forward each update, close), minus the transport.
While ``down`` is set it fails each call the way controller.api.client reports
an unreachable controller (ApiError UNAVAILABLE). The real transport and a real
controller outage are covered by tests/integration/ztunnel_core.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterable

from controller.api.errors import ApiError
from controller.api.model import RegistryState, ResourceType, TrustBundle, WatchUpdate, Workload
from controller.discovery import DiscoveryHub
from node.state import StateStore
from node.watch import Backoff, WatchClient

NODE = "node-a"


class HubSource:
    def __init__(self, hub: DiscoveryHub) -> None:
        self.hub = hub
        self.down = False
        self.requests: list[tuple[str, int]] = []

    async def watch(
        self, node: str = "", types: Iterable[ResourceType] = (), epoch: str = "", version: int = 0
    ) -> AsyncIterator[WatchUpdate]:
        self.requests.append((epoch, version))
        if self.down:
            raise ApiError(
                "UNAVAILABLE", "watch failed: controller unreachable (connection refused)"
            )
        sub = self.hub.subscribe(node, frozenset(types), epoch, version)
        try:
            while True:
                yield await sub.next()
        finally:
            sub.close()


def wl(name: str, ip: str) -> Workload:
    return Workload(name, "default", name, NODE, (ip,), enrolled=True)


def state(*ws: Workload) -> RegistryState:
    return RegistryState(workloads=ws)


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_snapshot_deltas_outage_resume_and_new_epoch() -> None:
    hub = DiscoveryHub(epoch="epoch-1")
    hub.publish(state(wl("a", "10.0.1.1")))
    hub.set_trust_bundle(TrustBundle("cluster.local", (b"root",)))
    source = HubSource(hub)
    store = StateStore(NODE)
    delays: list[float] = []

    async def fast_sleep(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0.001)

    client = WatchClient(
        source, store, backoff=Backoff(0.5, 4.0, rng=random.Random(1)), sleep=fast_sleep
    )
    task = asyncio.create_task(client.run())
    try:
        await until(lambda: store.current.synced, "first snapshot")
        assert store.current.workload_by_ip("10.0.1.1") is not None
        assert store.current.trust_bundle == TrustBundle("cluster.local", (b"root",))
        assert client.status().connected
        assert source.requests == [("", 0)]

        hub.publish(state(wl("a", "10.0.1.1"), wl("b", "10.0.1.2")))
        await until(lambda: store.current.workload_by_ip("10.0.1.2") is not None, "delta")
        held = store.current.version

        # Controller goes away: the node keeps serving what it had, retrying
        # with growing delays.
        source.down = True
        hub.close()
        await until(lambda: len(delays) >= 4, "four failed reconnects")
        assert not client.status().connected
        assert store.current.workload_by_ip("10.0.1.2") is not None
        assert "unreachable" in (client.status().last_error or "")
        assert delays[3] > delays[0]
        # Changes made while the node was away arrive as a resume delta.
        hub.publish(state(wl("b", "10.0.1.2")))
        source.down = False
        await until(lambda: store.current.workload_by_ip("10.0.1.1") is None, "resume delta")
        assert client.status().connected
        assert set(source.requests[1:]) == {("epoch-1", held)}

        # A restarted controller (new epoch) answers the resume with a snapshot.
        hub2 = DiscoveryHub(epoch="epoch-2")
        hub2.publish(state(wl("c", "10.0.1.3")))
        source.hub = hub2
        hub.close()
        await until(lambda: store.current.epoch == "epoch-2", "snapshot of the new epoch")
        assert store.current.workload_by_ip("10.0.1.2") is None
        assert store.current.workload_by_ip("10.0.1.3") is not None
        status = client.status()
        assert status.reconnects >= 5 and status.updates >= 4
        assert all(0 < d <= 4.0 for d in delays)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        hub.close()


async def test_backoff_grows_while_the_controller_is_down() -> None:
    source = HubSource(DiscoveryHub(epoch="e"))
    source.down = True
    store = StateStore(NODE)
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0)

    client = WatchClient(source, store, backoff=Backoff(0.5, 4.0, jitter=0.0), sleep=record)
    task = asyncio.create_task(client.run())
    try:
        await until(lambda: len(delays) >= 6, "six retries")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert not store.current.synced
    assert client.status().last_error is not None


async def test_mismatched_delta_restarts_with_a_snapshot() -> None:
    store = StateStore(NODE)
    store.apply(WatchUpdate("e1", 5, True, (wl("a", "10.0.1.1"),)))
    seen: list[tuple[str, int]] = []

    class Foreign:
        async def watch(
            self,
            node: str = "",
            types: Iterable[ResourceType] = (),
            epoch: str = "",
            version: int = 0,
        ) -> AsyncIterator[WatchUpdate]:
            seen.append((epoch, version))
            if len(seen) == 1:
                yield WatchUpdate("other", 6, False, (wl("x", "10.0.9.9"),))
            else:
                yield WatchUpdate("e2", 1, True, (wl("b", "10.0.1.2"),))

    async def no_sleep(seconds: float) -> None:
        await asyncio.sleep(0)

    client = WatchClient(Foreign(), store, sleep=no_sleep)
    await client.run_once()
    assert "epoch" in (client.status().last_error or "")
    assert store.current.workload_by_ip("10.0.1.1") is not None  # kept serving
    await client.run_once()
    assert seen == [("e1", 5), ("", 0)]
    assert store.current.epoch == "e2"
