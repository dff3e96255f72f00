"""Kubernetes mode against a real kube-apiserver when things break: two replicas on
the real Lease with the leader killed, the API server restarted mid-watch, and a
watch from a resourceVersion that etcd compacted away (410, then a clean relist).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import ControllerProcess, NodeView, joined, label_namespace, namespace, pod
from .control_plane import ControlPlane, TcpRelay

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]

LEASE = "/apis/coordination.k8s.io/v1/namespaces/veil-system/leases/veil-controller"


def lease_holder(plane: ControlPlane) -> str:
    try:
        return str(plane.request("GET", LEASE)["spec"].get("holderIdentity") or "")
    except Exception:
        return ""


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ca_fingerprint(proc: ControllerProcess) -> str:
    # The CA line the controller logs once it has loaded the CA from the Secret.
    for line in proc.output().splitlines():
        if "Kubernetes mode: CA " in line:
            return line.split("Kubernetes mode: CA ", 1)[1].split()[0]
    return ""


def accepted_status(plane: ControlPlane, ns: str, name: str) -> str:
    obj = plane.request(
        "GET", f"/apis/security.veil.io/v1/namespaces/{ns}/authorizationpolicies/{name}"
    )
    for c in obj.get("status", {}).get("conditions", []):
        if c.get("type") == "Accepted":
            return str(c.get("status"))
    return ""


async def test_two_replicas_share_one_ca_and_leader_and_the_standby_takes_over(
    plane: ControlPlane, controllers: Callable[..., ControllerProcess]
) -> None:
    one, two = controllers("ctl-1"), controllers("ctl-2")
    await one.wait_ready()
    await two.wait_ready()
    assert ca_fingerprint(one) and ca_fingerprint(one) == ca_fingerprint(two)
    holder = await eventually(lambda: lease_holder(plane), 20, "a Lease holder")
    assert holder in ("ctl-1", "ctl-2")
    leader, standby = (one, two) if holder == "ctl-1" else (two, one)
    # Both serve nodes with the one CA.
    namespace(plane, "ha", "ambient")
    pod(plane, "api", "ha", "10.3.0.1", node="node-a", sa="api")
    for ctl in (leader, standby):
        async with joined(plane, ctl, "node-a") as client, NodeView(client, "node-a") as view:
            await view.until(lambda w: "ha/api" in w, what=f"ha/api via {ctl.name}")

    leader.signal(signal.SIGKILL)  # no Lease release: the standby waits out the lease
    leader.proc.wait(10)
    await eventually(lambda: lease_holder(plane) == standby.name, 30, "the standby to lead")
    # Only the leader writes statuses: a new policy gets its condition from the standby.
    plane.apply(
        {
            "apiVersion": "security.veil.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "after-failover", "namespace": "ha"},
            "spec": {"action": "ALLOW", "rules": [{}]},
        }
    )
    await eventually(
        lambda: accepted_status(plane, "ha", "after-failover") == "True", 20, "Accepted=True"
    )


async def test_apiserver_restart_mid_watch_loses_and_duplicates_nothing(
    plane: ControlPlane, controllers: Callable[..., ControllerProcess]
) -> None:
    ctl = controllers("ctl-restart")
    await ctl.wait_ready()
    namespace(plane, "rs", "ambient")
    pod(plane, "stable", "rs", "10.4.0.1", node="node-a", sa="app")
    pod(plane, "doomed", "rs", "10.4.0.2", node="node-a", sa="app")
    async with joined(plane, ctl, "node-a") as client, NodeView(client, "node-a") as view:
        await view.until(lambda w: {"rs/stable", "rs/doomed"} <= w.keys(), what="rs pods")
        before = view.upserts.count("rs/stable")
        plane.stop_apiserver()
        await asyncio.to_thread(plane.start_apiserver)
        plane.request("DELETE", "/api/v1/namespaces/rs/pods/doomed", {"gracePeriodSeconds": 0})
        pod(plane, "fresh", "rs", "10.4.0.3", node="node-a", sa="app")
        await view.until(
            lambda w: "rs/fresh" in w and "rs/doomed" not in w,
            timeout=45,
            what="the changes made after the restart",
        )
        await asyncio.sleep(1.0)  # let any duplicate arrive before counting
        assert {k for k in view.workloads if k.startswith("rs/")} == {"rs/stable", "rs/fresh"}
        # The relists after the restart republished nothing for the unchanged pod.
        assert view.upserts.count("rs/stable") == before
        assert view.upserts.count("rs/fresh") == 1
    _, doc = ctl.health()
    assert doc["ready"], doc


async def test_a_watch_from_a_compacted_resource_version_gets_410_and_relists(
    plane: ControlPlane, controllers: Callable[..., ControllerProcess]
) -> None:
    relay = TcpRelay(plane.port)
    try:
        await _compacted(plane, controllers, relay)
    finally:
        relay.close()


async def _compacted(
    plane: ControlPlane, controllers: Callable[..., ControllerProcess], relay: TcpRelay
) -> None:
    ctl = controllers("ctl-compact", api_url=f"https://127.0.0.1:{relay.port}")
    await ctl.wait_ready()
    namespace(plane, "cmp")
    pod(plane, "p", "cmp", "10.5.0.1", node="node-a", sa="app")
    async with joined(plane, ctl, "node-a") as client, NodeView(client, "node-a") as view:
        await view.until(lambda w: "cmp/p" in w, what="cmp/p")
        # Move etcd past the namespaces watch's resourceVersion, compact, then cut
        # the controller's connections: its re-watch asks for a revision etcd no
        # longer has. (Namespaces bypass the watch cache, see control_plane.)
        for i in range(3):
            plane.apply(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": f"bump-{i}", "namespace": "cmp"},
                    "data": {"i": str(i)},
                }
            )
        plane.compact()
        assert relay.cut() > 0
        await eventually(lambda: "(410 Gone), relisting" in ctl.output(), 20, "the 410")
        label_namespace(plane, "cmp", "ambient")
        await view.until(lambda w: w["cmp/p"].enrolled, timeout=45, what="enrolled after relist")
    out = ctl.output()
    assert "watch namespaces:" in out and "(410 Gone), relisting" in out, out[-3000:]
