"""DiscoveryHub: snapshot then deltas, resume, coalescing, trust bundle, type filters."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.api.errors import ApiError
from controller.api.model import (
    AuthorizationPolicy,
    Labels,
    Namespace,
    PolicyAction,
    RegistryState,
    Resource,
    ResourceType,
    TrustBundle,
    WatchUpdate,
    Workload,
    resource_key,
)
from controller.discovery import DiscoveryHub, diff_resources, index_state
from controller.discovery.hub import HubSubscription

ALL = frozenset(ResourceType)
NS = Namespace("shop", Labels({"veil.io/dataplane-mode": "ambient"}))
BUNDLE1 = TrustBundle("cluster.local", (b"root-1",))
BUNDLE2 = TrustBundle("cluster.local", (b"root-1", b"root-2"))


def w(name: str, ip: str = "10.0.0.1", node: str = "n1") -> Workload:
    return Workload(name, "shop", name, node, (ip,), enrolled=True)


def state(*workloads: Workload, policies: tuple[AuthorizationPolicy, ...] = ()) -> RegistryState:
    return RegistryState(
        namespaces=(NS,),
        workloads=tuple(sorted(workloads, key=lambda x: x.key)),
        authorization_policies=policies,
    )


def keys(update: WatchUpdate) -> list[tuple[ResourceType, str]]:
    return [resource_key(r) for r in update.upserts]


def wk(name: str) -> tuple[ResourceType, str]:
    return (ResourceType.WORKLOAD, f"shop/{name}")


async def nxt(sub: HubSubscription) -> WatchUpdate:
    return await asyncio.wait_for(sub.next(), timeout=1)


async def nothing_pending(sub: HubSubscription) -> bool:
    try:
        await asyncio.wait_for(sub.next(), timeout=0.05)
    except TimeoutError:
        return True
    return False


async def test_snapshot_then_deltas() -> None:
    hub = DiscoveryHub(epoch="e1")
    hub.set_trust_bundle(BUNDLE1)
    hub.publish(state(w("a", "10.0.0.1"), w("b", "10.0.0.2")))
    sub = hub.subscribe("n1", ALL, "", 0)
    snap = await nxt(sub)
    assert snap.snapshot and snap.epoch == "e1" and snap.trust_bundle == BUNDLE1
    assert keys(snap) == [(ResourceType.NAMESPACE, "shop"), wk("a"), wk("b")]
    assert await nothing_pending(sub)

    hub.publish(state(w("a", "10.0.0.9"), w("c", "10.0.0.3")))
    delta = await nxt(sub)
    assert not delta.snapshot and delta.version > snap.version
    assert keys(delta) == [wk("a"), wk("c")]
    assert delta.upserts[0] == w("a", "10.0.0.9")
    assert delta.removals == (wk("b"),)
    assert delta.trust_bundle is None

    # An identical state is not a change: no version bump, no message.
    version = hub.version
    assert hub.publish(state(w("a", "10.0.0.9"), w("c", "10.0.0.3"))) == 0
    assert hub.version == version and await nothing_pending(sub)


async def test_trust_bundle_rides_on_the_stream_whatever_the_types() -> None:
    hub = DiscoveryHub()
    hub.set_trust_bundle(BUNDLE1)
    sub = hub.subscribe("n1", frozenset({ResourceType.AUTHORIZATION_POLICY}), "", 0)
    first = await nxt(sub)
    assert first.trust_bundle == BUNDLE1 and first.upserts == ()
    hub.set_trust_bundle(BUNDLE1)  # unchanged: nothing sent
    assert await nothing_pending(sub)
    hub.set_trust_bundle(BUNDLE2)
    update = await nxt(sub)
    assert update.trust_bundle == BUNDLE2 and update.upserts == () and update.removals == ()
    assert update.version == hub.version


async def test_types_filter_applies_to_snapshot_and_deltas() -> None:
    hub = DiscoveryHub()
    policy = AuthorizationPolicy("p", "shop", PolicyAction.DENY)
    hub.publish(state(w("a"), policies=(policy,)))
    sub = hub.subscribe("n1", frozenset({ResourceType.WORKLOAD}), "", 0)
    assert keys(await nxt(sub)) == [wk("a")]
    hub.publish(state(w("a"), policies=(AuthorizationPolicy("p", "shop", PolicyAction.ALLOW),)))
    assert await nothing_pending(sub)
    hub.publish(state(w("a", "10.0.0.2")))
    update = await nxt(sub)
    assert keys(update) == [wk("a")] and update.removals == ()


@pytest.mark.parametrize(
    ("epoch", "version", "snapshot"),
    [
        ("other", 2, True),  # another controller process: snapshot
        ("e1", 0, True),  # a node without state
        ("e1", 99, True),  # from the future: cannot be trusted
        ("e1", 2, False),
        ("e1", 3, False),  # fully current: an empty delta
    ],
)
async def test_resume_decision(epoch: str, version: int, snapshot: bool) -> None:
    hub = DiscoveryHub(epoch="e1")
    hub.set_trust_bundle(BUNDLE1)  # version 1
    hub.publish(state(w("a")))  # version 2
    hub.publish(state(w("a"), w("b", "10.0.0.2")))  # version 3
    first = await nxt(hub.subscribe("n1", ALL, epoch, version))
    assert first.snapshot is snapshot
    assert first.version == 3
    if not snapshot:
        assert keys(first) == ([wk("b")] if version == 2 else [])
        assert first.trust_bundle is None


async def test_resume_gets_only_changes_since() -> None:
    hub = DiscoveryHub(epoch="e1")
    hub.set_trust_bundle(BUNDLE1)
    hub.publish(state(w("a", "10.0.0.1"), w("b", "10.0.0.2"), w("c", "10.0.0.3")))
    sub = hub.subscribe("n1", ALL, "", 0)
    seen = (await nxt(sub)).version
    sub.close()

    hub.publish(state(w("a", "10.0.0.1"), w("b", "10.0.0.7"), w("c", "10.0.0.3")))  # b changed
    hub.publish(state(w("a", "10.0.0.1"), w("b", "10.0.0.7")))  # c removed
    hub.publish(state(w("a", "10.0.0.1"), w("b", "10.0.0.7"), w("d", "10.0.0.4")))  # d added
    hub.set_trust_bundle(BUNDLE2)

    resumed = await nxt(hub.subscribe("n1", ALL, "e1", seen))
    assert not resumed.snapshot
    assert keys(resumed) == [wk("b"), wk("d")]
    assert resumed.removals == (wk("c"),)
    assert resumed.trust_bundle == BUNDLE2
    assert resumed.version == hub.version


async def test_resume_older_than_tombstone_horizon_gets_snapshot() -> None:
    hub = DiscoveryHub(epoch="e1", max_tombstones=2)
    hub.publish(
        state(w("a", "10.0.0.1"), w("b", "10.0.0.2"), w("c", "10.0.0.3"), w("d", "10.0.0.4"))
    )
    old = hub.version
    hub.publish(state(w("b", "10.0.0.2"), w("c", "10.0.0.3"), w("d", "10.0.0.4")))  # -a
    mid = hub.version
    hub.publish(state(w("c", "10.0.0.3"), w("d", "10.0.0.4")))  # -b
    hub.publish(state(w("d", "10.0.0.4")))  # -c: the tombstone of a is forgotten
    assert (await nxt(hub.subscribe("n1", ALL, "e1", old))).snapshot
    later = await nxt(hub.subscribe("n1", ALL, "e1", mid))
    assert not later.snapshot and later.removals == (wk("b"), wk("c"))


async def test_slow_watcher_is_coalesced_and_does_not_block_a_fast_one() -> None:
    hub = DiscoveryHub()
    hub.publish(state(w("a", "10.0.0.1"), w("b", "10.0.0.2")))
    fast = hub.subscribe("fast", ALL, "", 0)
    slow = hub.subscribe("slow", ALL, "", 0)
    await nxt(fast)
    await nxt(slow)
    for i in range(1, 200):
        hub.publish(state(w("a", f"10.0.1.{i}"), w("b", "10.0.0.2")))
        update = await nxt(fast)
        assert update.upserts == (w("a", f"10.0.1.{i}"),)
        # The slow watcher holds one pending entry per key, never a queue of messages.
        assert slow.pending == 1
    hub.publish(state(w("b", "10.0.0.2"), w("c", "10.0.0.3")))  # -a +c
    hub.publish(state(w("a", "10.0.9.9"), w("b", "10.0.0.2")))  # +a -c
    assert slow.pending == 2
    update = await nxt(slow)
    assert update.upserts == (w("a", "10.0.9.9"),)
    assert update.removals == (wk("c"),)
    assert update.version == hub.version
    info = {i.node: i for i in hub.watchers()}
    assert info["slow"].pending == 0 and info["slow"].sent_version == hub.version


async def test_close_and_hub_close() -> None:
    hub = DiscoveryHub()
    a = hub.subscribe("a", ALL, "", 0)
    b = hub.subscribe("b", ALL, "", 0)
    await nxt(a)
    await nxt(b)
    a.close()
    a.close()
    assert [i.node for i in hub.watchers()] == ["b"]
    waiting = asyncio.create_task(b.next())
    await asyncio.sleep(0)
    hub.close()
    with pytest.raises(ApiError, match="UNAVAILABLE"):
        await asyncio.wait_for(waiting, timeout=1)
    assert hub.watchers() == []


def test_diff_resources_table() -> None:
    a1, a2, b = w("a", "10.0.0.1"), w("a", "10.0.0.2"), w("b", "10.0.0.3")
    old = index_state(state(a1, b))
    assert diff_resources(old, index_state(state(a1, b))) == []
    assert diff_resources(old, index_state(state(a2, b))) == [(wk("a"), a2)]
    assert diff_resources(old, index_state(state(a1))) == [(wk("b"), None)]
    # Same count of keys, one replaced by another: the removal is still found.
    c = w("c", "10.0.0.4")
    assert diff_resources(old, index_state(state(a1, c))) == [(wk("c"), c), (wk("b"), None)]
    assert diff_resources({}, index_state(state(a1))) == [
        ((ResourceType.NAMESPACE, "shop"), NS),
        (wk("a"), a1),
    ]


# -- property: any sequence of states, any resume point, converges on the hub's state --

_states = st.lists(
    st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 3), max_size=6),
    min_size=1,
    max_size=8,
)


def _to_state(spec: dict[str, int]) -> RegistryState:
    return state(*(w(n, f"10.0.{v}.{ord(n)}") for n, v in spec.items()))


def _apply(held: dict[tuple[ResourceType, str], Resource], update: WatchUpdate) -> None:
    if update.snapshot:
        held.clear()
    for r in update.upserts:
        held[resource_key(r)] = r
    for k in update.removals:
        held.pop(k, None)


@settings(max_examples=100)
@given(_states, st.integers(0, 8), st.integers(1, 4))
async def test_watchers_converge(
    specs: list[dict[str, int]], resume_at: int, tombstones: int
) -> None:
    hub = DiscoveryHub(epoch="e", max_tombstones=tombstones)
    live = hub.subscribe("live", ALL, "", 0)
    held: dict[tuple[ResourceType, str], Resource] = {}
    _apply(held, await live.next())
    resume_from: tuple[dict[tuple[ResourceType, str], Resource], int] | None = None
    for i, spec in enumerate(specs):
        hub.publish(_to_state(spec))
        if i % 2 == 0:  # the live watcher reads only sometimes: coalescing
            while live.pending:
                _apply(held, await live.next())
        if i == resume_at:
            while live.pending:
                _apply(held, await live.next())
            resume_from = (dict(held), hub.version)
    while live.pending:
        _apply(held, await live.next())
    expected = index_state(_to_state(specs[-1]))
    assert held == expected
    if resume_from is not None:
        copy, version = resume_from
        again = hub.subscribe("again", ALL, "e", version)
        _apply(copy, await again.next())
        assert copy == expected


async def test_concurrent_snapshots_are_limited_and_a_stuck_reader_cannot_hold_a_slot() -> None:
    hub = DiscoveryHub(concurrent_snapshots=1, snapshot_slot_seconds=0.3)
    hub.publish(state(w("a")))
    first = hub.subscribe("n1", ALL, "", 0)
    second = hub.subscribe("n2", ALL, "", 0)
    third = hub.subscribe("n3", ALL, "", 0)
    assert (await nxt(first)).snapshot
    # n1's snapshot is "being written" until it asks for more: n2 waits.
    waiting = asyncio.create_task(second.next())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    reading = asyncio.create_task(first.next())  # n1 done with its snapshot: slot freed
    assert (await asyncio.wait_for(waiting, 1)).snapshot
    # n2 never asks again; its slot expires and n3 still gets its snapshot.
    assert (await asyncio.wait_for(third.next(), 2)).snapshot
    reading.cancel()
    for sub in (first, second, third):
        sub.close()
    # Resume deltas are small and never wait for a slot.
    hub2 = DiscoveryHub(epoch="e", concurrent_snapshots=1)
    hub2.publish(state(w("a")))
    held = hub2.subscribe("n1", ALL, "", 0)
    await nxt(held)
    assert not (await nxt(hub2.subscribe("n2", ALL, "e", hub2.version))).snapshot
