"""The Kubernetes registry source against the API double, through to a watching node.

The path under test is the production one: API double (HTTP, watch streams) ->
kubernetes_asyncio ApiClient -> Reflectors -> convert -> RegistryHolder ->
DiscoveryHub -> a node's Discovery subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from controller.api.model import (
    AuthorizationPolicy,
    RegistryState,
    ResourceType,
    WatchUpdate,
    Workload,
)
from controller.discovery import DiscoveryHub
from controller.k8s.client import KubeClient
from controller.k8s.kinds import PODS
from controller.k8s.reflector import WatchSettings
from controller.k8s.source import KubernetesSource
from controller.k8s.status import StatusWriter
from controller.registry import RegistryHolder

from .conftest import FAST_WATCH, ThreadedApiServer, authz, eventually, namespace, pod

pytestmark = pytest.mark.timeout(30)


@dataclass
class Running:
    source: KubernetesSource
    holder: RegistryHolder
    hub: DiscoveryHub
    status: StatusWriter
    client: KubeClient

    def state(self) -> RegistryState:
        return self.holder.current()


@contextlib.asynccontextmanager
async def running_source(api: ThreadedApiServer, leader: bool = True) -> AsyncIterator[Running]:
    client = api.client()
    holder = RegistryHolder(trust_domain="cluster.local")
    hub = DiscoveryHub()
    holder.subscribe(hub.publish)
    source = KubernetesSource(client, holder, "cluster.local", settings=FAST_WATCH, debounce=0.02)
    status = StatusWriter(client, source.lookup, lambda: leader)
    source.set_status_writer(status)
    tasks = [asyncio.create_task(source.run()), asyncio.create_task(status.run())]
    try:
        await asyncio.wait_for(source.wait_synced(), 5)
        yield Running(source, holder, hub, status, client)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await client.close()


def workloads(state: RegistryState) -> dict[str, Workload]:
    return {w.key: w for w in state.workloads}


async def next_update(sub: Any, timeout: float = 5.0) -> WatchUpdate:
    update: WatchUpdate = await asyncio.wait_for(sub.next(), timeout)
    return update


def seed_shop(api: ThreadedApiServer, mode: str | None = None) -> None:
    api.put("namespaces", namespace("shop", mode))
    api.put("pods", pod("checkout", "shop", "10.1.0.1", labels={"app": "checkout"}))
    api.put("pods", pod("payments", "shop", "10.1.0.2", node="node-b", labels={"app": "payments"}))
    api.put(
        "pods",
        pod(
            "legacy", "shop", "10.1.0.3", labels={"app": "legacy", "veil.io/dataplane-mode": "none"}
        ),
    )


async def test_enrolling_a_namespace_by_label_reaches_a_watching_node(
    apiserver: ThreadedApiServer,
) -> None:
    seed_shop(apiserver)
    async with running_source(apiserver) as run:
        sub = run.hub.subscribe("node-a", frozenset(ResourceType), "", 0)
        snapshot = await next_update(sub)
        assert snapshot.snapshot
        seen = {r.key: r for r in snapshot.upserts if isinstance(r, Workload)}
        assert set(seen) == {"shop/checkout", "shop/payments", "shop/legacy"}
        assert not any(w.enrolled for w in seen.values())

        apiserver.put("namespaces", namespace("shop", "ambient"))
        update = await next_update(sub)
        assert not update.snapshot
        changed = {r.key: r for r in update.upserts if isinstance(r, Workload)}
        assert changed["shop/checkout"].enrolled and changed["shop/payments"].enrolled
        # The opted-out pod is still known (its IP is meaningful) but not enrolled.
        assert "shop/legacy" not in changed or not changed["shop/legacy"].enrolled
        assert not workloads(run.state())["shop/legacy"].enrolled

        # Opting a running pod out later removes it from the mesh.
        opted = pod(
            "checkout",
            "shop",
            "10.1.0.1",
            labels={"app": "checkout", "veil.io/dataplane-mode": "none"},
        )
        apiserver.put("pods", opted)
        update = await next_update(sub)
        (w,) = [r for r in update.upserts if isinstance(r, Workload)]
        assert w.key == "shop/checkout" and not w.enrolled
        sub.close()


async def test_policy_edit_propagates_and_delete_removes(apiserver: ThreadedApiServer) -> None:
    seed_shop(apiserver, "ambient")
    spec = {
        "selector": {"matchLabels": {"app": "payments"}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/checkout"]}}]}],
    }
    apiserver.put("authorizationpolicies", authz("payments", "shop", spec))
    async with running_source(apiserver) as run:
        sub = run.hub.subscribe("node-b", frozenset({ResourceType.AUTHORIZATION_POLICY}), "", 0)
        snapshot = await next_update(sub)
        (p,) = snapshot.upserts
        assert isinstance(p, AuthorizationPolicy) and p.rules[0].operations == ()

        spec["rules"][0]["to"] = [{"operation": {"ports": ["8443"]}}]  # type: ignore[index]
        apiserver.put("authorizationpolicies", authz("payments", "shop", spec))
        update = await next_update(sub)
        (p,) = update.upserts
        assert isinstance(p, AuthorizationPolicy) and p.rules[0].operations[0].ports == (8443,)

        apiserver.delete("authorizationpolicies", "shop", "payments")
        update = await next_update(sub)
        assert update.removals == ((ResourceType.AUTHORIZATION_POLICY, "shop/payments"),)
        sub.close()


def accepted(api: ThreadedApiServer, name: str) -> dict[str, Any] | None:
    obj = api.get("authorizationpolicies", "shop", name)
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Accepted":
            return dict(cond)
    return None


async def test_invalid_policy_gets_a_status_condition_and_is_not_applied(
    apiserver: ThreadedApiServer,
) -> None:
    seed_shop(apiserver, "ambient")
    bad = {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}
    apiserver.put("authorizationpolicies", authz("broken", "shop", bad))
    async with running_source(apiserver) as run:
        await eventually(lambda: accepted(apiserver, "broken") is not None, what="status written")
        cond = accepted(apiserver, "broken")
        assert cond is not None
        assert (cond["status"], cond["reason"], cond["observedGeneration"]) == (
            "False",
            "Invalid",
            1,
        )
        assert "AuthorizationPolicy shop/broken" in cond["message"]
        assert "spec.rules[0].from[0].source.ipBlocks[0]" in cond["message"]
        assert run.state().authorization_policies == ()

        # Fixing the spec applies it and flips the condition.
        bad["rules"][0]["from"][0]["source"]["ipBlocks"] = ["10.0.0.0/8"]  # type: ignore[index]
        apiserver.put("authorizationpolicies", authz("broken", "shop", bad))
        await eventually(lambda: (accepted(apiserver, "broken") or {}).get("status") == "True")
        await eventually(lambda: len(run.state().authorization_policies) == 1)
        cond = accepted(apiserver, "broken")
        assert cond is not None and cond["reason"] == "Accepted" and cond["observedGeneration"] == 2

        # The status write comes back as a watch event; it must not trigger another write.
        await asyncio.sleep(0.3)
        writes = run.status.writes
        await asyncio.sleep(0.3)
        assert run.status.writes == writes == 2
        patches = apiserver.read(lambda d: list(d.status_patches))
        assert len(patches) == 2


async def test_follower_writes_no_status(apiserver: ThreadedApiServer) -> None:
    seed_shop(apiserver, "ambient")
    apiserver.put(
        "authorizationpolicies",
        authz("broken", "shop", {"action": "DENY", "rules": [{"when": [{"key": "x"}]}]}),
    )
    async with running_source(apiserver, leader=False) as run:
        await asyncio.sleep(0.3)
        assert run.status.writes == 0
        assert apiserver.read(lambda d: list(d.status_patches)) == []
        assert run.state().authorization_policies == ()


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
async def test_relist_after_410_loses_nothing_and_duplicates_nothing(
    apiserver: ThreadedApiServer, gone_as_http: bool
) -> None:
    apiserver.set(gone_as_http=gone_as_http)
    seed_shop(apiserver, "ambient")
    async with running_source(apiserver) as run:
        pods = run.source.reflectors[PODS]
        assert pods.stats.lists == 1
        # Cut the watches and keep them out while the cluster changes and the
        # server compacts its history: the reflector comes back with a stale version.
        apiserver.set(fail_next={("GET", "pods"): 503})
        apiserver.drop_watches()
        apiserver.delete("pods", "shop", "payments")
        apiserver.put("pods", pod("cart", "shop", "10.1.0.4", labels={"app": "cart"}))
        apiserver.put("pods", pod("checkout", "shop", "10.1.0.9", labels={"app": "checkout"}))
        apiserver.compact()

        await eventually(lambda: pods.stats.gone >= 1, what="a 410")
        await eventually(
            lambda: set(workloads(run.state())) == {"shop/checkout", "shop/cart", "shop/legacy"}
        )
        state = run.state()
        assert workloads(state)["shop/checkout"].ips == ("10.1.0.9",)
        assert len(state.workloads) == len({w.key for w in state.workloads}) == 3
        assert pods.stats.lists == 2
        # And the watch resumes after the relist: later changes still arrive.
        apiserver.put("pods", pod("late", "shop", "10.1.0.5"))
        await eventually(lambda: "shop/late" in workloads(run.state()))


async def test_error_event_410_on_a_live_watch_relists(apiserver: ThreadedApiServer) -> None:
    seed_shop(apiserver, "ambient")
    async with running_source(apiserver) as run:
        pods = run.source.reflectors[PODS]
        await eventually(lambda: apiserver.read(lambda d: d.open_watches) >= 6)
        apiserver.inject_watch_error(410)
        await eventually(lambda: pods.stats.lists == 2 and pods.stats.gone >= 1)
        apiserver.put("pods", pod("after", "shop", "10.1.0.6"))
        await eventually(lambda: "shop/after" in workloads(run.state()))
        assert len(run.state().workloads) == 4


async def test_dropped_connections_resume_from_the_last_version(
    apiserver: ThreadedApiServer,
) -> None:
    seed_shop(apiserver, "ambient")
    async with running_source(apiserver) as run:
        pods = run.source.reflectors[PODS]
        for i in range(5):
            apiserver.drop_watches()
            apiserver.put("pods", pod(f"p{i}", "shop", f"10.1.1.{i}"))
            await eventually(lambda i=i: f"shop/p{i}" in workloads(run.state()))
        assert pods.stats.lists == 1  # resumed every time; never relisted
        assert pods.stats.watches >= 5
        assert pods.stats.errors >= 1
        assert len(run.state().workloads) == 8


async def test_bookmarks_move_the_resume_point(apiserver: ThreadedApiServer) -> None:
    apiserver.set(bookmark_interval=0.05)
    seed_shop(apiserver, "ambient")
    async with running_source(apiserver) as run:
        pods = run.source.reflectors[PODS]
        before = pods.cache.resource_version
        # Changes to other types move the server's version; pods see only bookmarks.
        for i in range(3):
            apiserver.put("namespaces", namespace(f"other-{i}"))
        server_rv = str(apiserver.read(lambda d: d.rv))
        await eventually(lambda: pods.cache.resource_version == server_rv, what="bookmark")
        assert pods.stats.bookmarks >= 1 and int(pods.cache.resource_version) > int(before)
        # A compaction now does not force a relist: the bookmark kept us current.
        apiserver.compact()
        apiserver.drop_watches()
        apiserver.put("pods", pod("x", "shop", "10.1.0.7"))
        await eventually(lambda: "shop/x" in workloads(run.state()))
        assert pods.stats.lists == 1


async def test_server_ending_watches_rewatches_without_relisting(
    apiserver: ThreadedApiServer,
) -> None:
    seed_shop(apiserver, "ambient")
    short = WatchSettings(min_timeout=1, max_timeout=1, backoff_initial=0.05, backoff_cap=0.3)
    client = apiserver.client()
    holder = RegistryHolder(trust_domain="cluster.local")
    source = KubernetesSource(client, holder, "cluster.local", settings=short, debounce=0.02)
    task = asyncio.create_task(source.run())
    try:
        await asyncio.wait_for(source.wait_synced(), 5)
        pods = source.reflectors[PODS]
        await eventually(lambda: pods.stats.watches >= 2, timeout=5, what="a second watch")
        apiserver.put("pods", pod("after-timeout", "shop", "10.1.0.8"))
        await eventually(lambda: "shop/after-timeout" in workloads(holder.current()))
        assert pods.stats.lists == 1 and pods.stats.errors == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()


async def test_lists_are_paginated_and_restart_when_the_token_expires(
    apiserver: ThreadedApiServer,
) -> None:
    apiserver.put("namespaces", namespace("shop"))
    for i in range(7):
        apiserver.put("pods", pod(f"p{i}", "shop", f"10.1.2.{i}"))
    client = apiserver.client()
    try:
        items, rv = await client.list(PODS, page_size=3)
        assert sorted(i["metadata"]["name"] for i in items) == [f"p{i}" for i in range(7)]
        assert rv == str(apiserver.read(lambda d: d.rv))
        pages = [r for r in apiserver.read(lambda d: list(d.requests)) if r[1] == "/api/v1/pods"]
        assert len(pages) == 3
        # A continue token that expires mid-list: the list starts over, never mixing snapshots.
        apiserver.set(expire_next_continue=True)
        before = len(apiserver.read(lambda d: list(d.requests)))
        items, _ = await client.list(PODS, page_size=3)
        assert len(items) == 7 and not apiserver.read(lambda d: d.expire_next_continue)
        # The first page, the refused second one, then all three pages again.
        assert len(apiserver.read(lambda d: list(d.requests))) - before == 5
    finally:
        await client.close()
