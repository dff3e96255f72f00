"""Kubernetes mode against a real kube-apiserver: enrollment, opt-out, policy status
and propagation, node-scoped identities, API version discovery, RBAC failures and
SIGTERM during startup.

The controller is ``veil controller run --source kubernetes`` in its own process,
authenticated with the veil-controller ServiceAccount's token under the shipped
RBAC; nodes join with pod-bound veil-node tokens (TokenRequest, TokenReview).
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.api.errors import ApiError as ControllerApiError
from controller.api.model import AuthorizationPolicy, ResourceType
from controller.api.spiffe import SpiffeId
from node.csr import build_csr, generate_key

from .conftest import (
    TD,
    ControllerProcess,
    NodeView,
    joined,
    label_namespace,
    namespace,
    node_token,
    pod,
    running_controller,
)
from .control_plane import ROOT, ControlPlane, daemonset_manifests, free_port

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.fixture(scope="module")
def ctl(
    plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControllerProcess]:
    with running_controller(plane, tmp_path_factory.mktemp("ctl"), "ctl-mesh") as proc:
        yield proc


def authz(plane: ControlPlane, name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return plane.apply(
        {
            "apiVersion": "security.veil.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


def accepted(plane: ControlPlane, ns: str, name: str) -> dict[str, Any] | None:
    obj = plane.request(
        "GET", f"/apis/security.veil.io/v1/namespaces/{ns}/authorizationpolicies/{name}"
    )
    for c in obj.get("status", {}).get("conditions", []):
        if c.get("type") == "Accepted" and obj["status"].get("observedGeneration") == obj[
            "metadata"
        ].get("generation"):
            return dict(c)
    return None


async def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_labelling_a_namespace_enrolls_its_pods_at_a_watching_node(
    plane: ControlPlane, ctl: ControllerProcess
) -> None:
    namespace(plane, "shop")
    pod(plane, "checkout", "shop", "10.1.0.1", node="node-a", sa="checkout")
    async with joined(plane, ctl, "node-a") as node_a, NodeView(node_a, "node-a") as view:
        await view.until(lambda w: "shop/checkout" in w, what="shop/checkout")
        assert not view.workloads["shop/checkout"].enrolled
        label_namespace(plane, "shop", "ambient")
        await view.until(
            lambda w: w["shop/checkout"].enrolled, what="checkout enrolled by the label"
        )


async def test_an_opt_out_pod_stays_out(plane: ControlPlane, ctl: ControllerProcess) -> None:
    namespace(plane, "blog", "ambient")
    pod(plane, "writer", "blog", "10.1.0.2", node="node-a", sa="writer")
    pod(
        plane,
        "legacy",
        "blog",
        "10.1.0.3",
        node="node-a",
        sa="writer",
        labels={"veil.io/dataplane-mode": "none"},
    )
    async with joined(plane, ctl, "node-a") as node_a, NodeView(node_a, "node-a") as view:
        await view.until(lambda w: {"blog/writer", "blog/legacy"} <= w.keys(), what="blog pods")
        assert view.workloads["blog/writer"].enrolled
        assert not view.workloads["blog/legacy"].enrolled


async def test_a_policy_edit_propagates_and_an_invalid_policy_is_never_applied(
    plane: ControlPlane, ctl: ControllerProcess
) -> None:
    namespace(plane, "pay", "ambient")
    rule = {"from": [{"source": {"principals": [f"{TD}/ns/pay/sa/checkout"]}}]}
    authz(plane, "allow-checkout", "pay", {"action": "ALLOW", "rules": [rule]})
    async with joined(plane, ctl, "node-a") as node_a:
        policies: dict[str, AuthorizationPolicy] = {}

        async def follow() -> None:
            async for update in node_a.watch(
                node="node-a", types=[ResourceType.AUTHORIZATION_POLICY]
            ):
                if update.snapshot:
                    policies.clear()
                for r in update.upserts:
                    if isinstance(r, AuthorizationPolicy):
                        policies[r.key] = r
                for _, key in update.removals:
                    policies.pop(key, None)

        task = asyncio.create_task(follow())
        try:
            await eventually(
                lambda: "pay/allow-checkout" in policies, what="the policy at the node"
            )
            cond = await eventually(
                lambda: accepted(plane, "pay", "allow-checkout"), what="Accepted condition"
            )
            assert cond["status"] == "True"

            rule["from"][0]["source"]["principals"] = [f"{TD}/ns/pay/sa/frontend"]
            authz(plane, "allow-checkout", "pay", {"action": "ALLOW", "rules": [rule]})
            await eventually(
                lambda: (
                    policies["pay/allow-checkout"].rules[0].sources[0].principals
                    == (f"{TD}/ns/pay/sa/frontend",)
                ),
                what="the edited policy at the node",
            )

            bad = {"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}
            authz(plane, "broken", "pay", {"action": "ALLOW", "rules": [bad]})
            cond = await eventually(
                lambda: accepted(plane, "pay", "broken"), what="Accepted=False on the invalid one"
            )
            assert cond["status"] == "False"
            assert "ipBlocks" in cond["message"], cond
            # A later valid edit elsewhere is published; the invalid one never is.
            authz(
                plane,
                "deny-all-else",
                "pay",
                {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]},
            )
            await eventually(lambda: "pay/deny-all-else" in policies, what="the later policy")
            assert "pay/broken" not in policies
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_node_a_cannot_obtain_node_b_identities(
    plane: ControlPlane, ctl: ControllerProcess
) -> None:
    namespace(plane, "bank", "ambient")
    pod(plane, "teller", "bank", "10.1.0.9", node="node-a", sa="teller")
    pod(plane, "vault", "bank", "10.2.0.9", node="node-b", sa="vault")

    async def svid(client: Any, sa: str) -> Any:
        identity = SpiffeId(TD, f"/ns/bank/sa/{sa}")
        return await client.create_certificate(build_csr(generate_key(), identity), str(identity))

    async def svid_once_seen(client: Any, sa: str) -> Any:
        """The pods reach the controller through its watch, a moment after they are
        created: until then every node is refused, so retry for a bounded while."""
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                return await svid(client, sa)
            except ControllerApiError as e:
                if e.code != "PERMISSION_DENIED" or asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.2)

    # Both pods are known to the controller first, so node-a's refusal below is
    # the node-scoping rule, not a pod the controller has not seen yet.
    async with joined(plane, ctl, "node-b") as node_b:
        assert await svid_once_seen(node_b, "vault")
    async with joined(plane, ctl, "node-a") as node_a:
        chain = await svid_once_seen(node_a, "teller")
        assert chain
        with pytest.raises(ControllerApiError) as refused:
            await svid(node_a, "vault")
        assert refused.value.code == "PERMISSION_DENIED"
    # node-a's pod-bound token cannot join as node-b either.
    from controller.api.client import join_node
    from controller.api.spiffe import node_identity

    from .conftest import root_pem

    with pytest.raises(ControllerApiError) as wrong:
        await join_node(
            ctl.join,
            root_pem(plane),
            node_token(plane, "node-a"),
            "node-b",
            build_csr(generate_key(), node_identity(TD, "node-b")),
        )
    assert wrong.value.code == "UNAUTHENTICATED"


async def test_endpointslices_are_read_at_the_version_the_server_serves(
    plane: ControlPlane, ctl: ControllerProcess
) -> None:
    _, doc = ctl.health()
    checks = {c["name"]: c for c in doc["checks"]}
    # kube-apiserver 1.20 serves discovery.k8s.io/v1beta1 only.
    assert checks["endpointslices"]["state"] == "synced", checks
    assert "discovery.k8s.io/v1beta1" in checks["endpointslices"]["detail"]
    assert "reading endpointslices as discovery.k8s.io/v1beta1" in ctl.output()
    assert all(c["ok"] for c in checks.values()), checks


def _limited_rbac(plane: ControlPlane) -> None:
    """A copy of the shipped RBAC for another ServiceAccount, minus "list" on pods and services."""
    plane.apply(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "veil-limited", "namespace": "veil-system"},
        }
    )
    for doc in daemonset_manifests():
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"]["name"] = "veil-limited"
        if doc["kind"] == "ClusterRole":
            for rule in doc["rules"]:
                if "pods" in rule["resources"] or "services" in rule["resources"]:
                    rule["verbs"] = [v for v in rule["verbs"] if v != "list"]
        if "roleRef" in doc:
            doc["roleRef"]["name"] = "veil-limited"
            doc["subjects"][0]["name"] = "veil-limited"
        plane.apply(doc)


async def test_a_removed_rbac_verb_is_reported_with_its_cause_and_sigterm_still_works(
    plane: ControlPlane, tmp_path: Path
) -> None:
    _limited_rbac(plane)
    proc = ControllerProcess(plane, tmp_path, "ctl-limited", service_account="veil-limited")
    try:

        def failed(status: int, doc: dict[str, Any]) -> bool:
            states = {c["name"]: c["state"] for c in doc.get("checks", [])}
            return states.get("pods") == "failed" and states.get("services") == "failed"

        doc = await proc.wait_health(failed, 45)
        assert not doc["ready"]
        checks = {c["name"]: c for c in doc["checks"]}
        assert "verb 'list'" in checks["pods"]["detail"] and "'pods'" in checks["pods"]["detail"]
        assert checks["pods"]["required"] and not checks["services"]["required"]
        assert "ClusterRole veil-controller" in checks["pods"]["hint"]
        out = proc.output()
        assert "ERROR" in out and "cannot list pods" in out, out[-2000:]
        assert "are the Veil CRDs installed" not in out
        # The status command says the same, and exits 3 (not ready).
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "cli.veil",
                "controller",
                "status",
                "--health-addr",
                f"127.0.0.1:{proc.health_port}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 3, status
        assert "NOT READY" in status.stdout and "forbidden by RBAC" in status.stdout
        # Stuck in startup (never served): SIGTERM still ends it promptly.
        started = time.monotonic()
        assert proc.stop(timeout=10) == 0, proc.output()[-2000:]
        elapsed = time.monotonic() - started
        print(f"{proc.name} exited {elapsed:.2f}s after SIGTERM")
        assert elapsed < 10
    finally:
        proc.stop()


async def test_sigterm_ends_a_controller_retrying_an_unreachable_api_server(
    plane: ControlPlane, tmp_path: Path
) -> None:
    proc = ControllerProcess(plane, tmp_path, "ctl-lost")
    # Point it at a port nobody listens on: it retries the CA Secret forever.
    proc.stop()
    argv = list(proc.proc.args)  # type: ignore[arg-type]
    argv[argv.index("--kube-api") + 1] = f"https://127.0.0.1:{free_port()}"
    with proc.log.open("ab") as out:
        proc.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        doc = await proc.wait_health(lambda s, d: "CA not available yet" in d.get("detail", ""), 30)
        assert doc["phase"] == "starting" and not doc["ready"]
        started = time.monotonic()
        assert proc.stop(timeout=10) == 0, proc.output()[-2000:]
        elapsed = time.monotonic() - started
        print(f"{proc.name} exited {elapsed:.2f}s after SIGTERM")
        assert elapsed < 10
    finally:
        proc.stop()
