"""Which kinds the source can read, against the API double: version discovery,
and kinds that cannot be listed (403, 404, repeated 5xx) reported with their cause.

The real API server proves the common cases (tests/k8s_real); the double makes
the rest happen on demand: a server with only v1 EndpointSlices, a CRD group
that vanished, a kind that keeps answering 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from controller.api.model import RegistryState
from controller.k8s.kinds import ENDPOINT_SLICES
from controller.k8s.source import KindHealth, KubernetesSource
from controller.registry import RegistryHolder

from .conftest import FAST_WATCH, ThreadedApiServer, eventually, namespace, pod

pytestmark = pytest.mark.timeout(30)


def seed(api: ThreadedApiServer, slice_version: str) -> None:
    api.put("namespaces", namespace("shop", "ambient"))
    api.put("pods", pod("checkout", "shop", "10.1.0.1", sa="checkout"))
    api.put(
        "services",
        {
            "metadata": {"name": "legacy", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
        },
    )
    api.put(
        "endpointslices",
        {
            "apiVersion": f"discovery.k8s.io/{slice_version}",
            "metadata": {
                "name": "legacy-1",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "legacy"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": ["10.1.0.1"],
                    "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": "checkout"},
                    # v1beta1 spells the node as topology, v1 as nodeName.
                    **(
                        {"topology": {"kubernetes.io/hostname": "node-a"}}
                        if slice_version == "v1beta1"
                        else {"nodeName": "node-a"}
                    ),
                }
            ],
        },
    )


@contextlib.asynccontextmanager
async def source_on(api: ThreadedApiServer) -> AsyncIterator[KubernetesSource]:
    client = api.client()
    holder = RegistryHolder(trust_domain="cluster.local")
    source = KubernetesSource(client, holder, "cluster.local", settings=FAST_WATCH, debounce=0.02)
    task = asyncio.create_task(source.run())
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()


def health(source: KubernetesSource) -> dict[str, KindHealth]:
    return {h.kind: h for h in source.health()}


async def synced_state(api: ThreadedApiServer) -> tuple[RegistryState, dict[str, KindHealth]]:
    async with source_on(api) as source:
        await asyncio.wait_for(source.wait_synced(), 5)
        return source._holder.current(), health(source)


async def test_endpointslices_are_read_at_the_newest_served_version_with_the_same_result(
    apiserver: ThreadedApiServer,
) -> None:
    seed(apiserver, "v1")
    state_v1, health_v1 = await synced_state(apiserver)
    assert health_v1["endpointslices"].api_version == "discovery.k8s.io/v1"

    apiserver.read(lambda d: d.served_groups.__setitem__("discovery.k8s.io", ["v1beta1"]))
    seed(apiserver, "v1beta1")
    state_beta, health_beta = await synced_state(apiserver)
    assert health_beta["endpointslices"].api_version == "discovery.k8s.io/v1beta1"
    paths = apiserver.read(lambda d: [p for _, p in d.requests])
    assert "/apis/discovery.k8s.io/v1beta1/endpointslices" in paths
    (legacy,) = [s for s in state_beta.services if s.name == "legacy"]
    assert legacy.endpoints == ("shop/checkout",)
    assert state_beta.services == state_v1.services
    assert state_beta.workloads == state_v1.workloads


async def test_a_forbidden_optional_kind_starts_degraded_with_the_rbac_cause(
    apiserver: ThreadedApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    seed(apiserver, "v1")
    apiserver.read(lambda d: d.fail_always.__setitem__(("GET", "services"), 403))
    with caplog.at_level(logging.ERROR, "veil.controller.k8s"):
        async with source_on(apiserver) as source:
            await asyncio.wait_for(source.wait_synced(), 5)
            h = health(source)
            assert h["services"].state == "failed" and not h["services"].required
            assert "verb 'list' on resource 'services'" in h["services"].cause
            assert "ClusterRole veil-controller" in h["services"].hint
            assert h["pods"].ok and h["endpointslices"].ok
            assert source._holder.current().services == ()  # VIPs empty until it lists
            # Granting the verb heals it without a restart.
            apiserver.read(lambda d: d.fail_always.clear())
            await eventually(lambda: health(source)["services"].ok, 5, what="services listed")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("cannot list services" in m for m in errors), errors
    assert sum("cannot list services" in m for m in errors) == 1  # once, not per retry


async def test_a_forbidden_required_kind_keeps_the_source_unsynced(
    apiserver: ThreadedApiServer,
) -> None:
    seed(apiserver, "v1")
    apiserver.read(lambda d: d.fail_always.__setitem__(("GET", "pods"), 403))
    async with source_on(apiserver) as source:
        await eventually(lambda: health(source)["pods"].state == "failed", 5, what="pods failed")
        assert not source.synced.is_set()
        assert health(source)["pods"].required


async def test_a_missing_crd_group_names_the_group_and_the_fix(
    apiserver: ThreadedApiServer,
) -> None:
    seed(apiserver, "v1")
    apiserver.read(lambda d: d.served_groups.pop("security.veil.io"))
    async with source_on(apiserver) as source:
        await eventually(
            lambda: health(source)["authorizationpolicies"].state == "failed", 5, what="failed"
        )
        h = health(source)["authorizationpolicies"]
        assert "does not serve security.veil.io/v1 authorizationpolicies" in h.cause
        assert "install the Veil CRDs" in h.hint
        assert not source.synced.is_set()


async def test_a_group_with_no_version_veil_reads_is_reported(
    apiserver: ThreadedApiServer,
) -> None:
    seed(apiserver, "v1")
    apiserver.read(lambda d: d.served_groups.__setitem__("discovery.k8s.io", ["v2alpha9"]))
    async with source_on(apiserver) as source:
        await asyncio.wait_for(source.wait_synced(), 5)  # optional: serves degraded
        h = health(source)["endpointslices"]
        assert h.state == "failed"
        assert "discovery.k8s.io/v1 or discovery.k8s.io/v1beta1" in h.cause
        assert "offered: v2alpha9" in h.cause


async def test_repeated_server_errors_fail_a_kind_after_a_streak(
    apiserver: ThreadedApiServer,
) -> None:
    seed(apiserver, "v1")
    apiserver.read(lambda d: d.fail_always.__setitem__(("GET", "endpointslices"), 500))
    async with source_on(apiserver) as source:
        await asyncio.wait_for(source.wait_synced(), 10)
        h = health(source)["endpointslices"]
        assert h.state == "failed" and "3 times in a row" in h.cause
        assert ENDPOINT_SLICES in source.reflectors
