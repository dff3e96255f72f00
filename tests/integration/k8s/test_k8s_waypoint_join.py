"""Kubernetes mode: a waypoint pod joins with its own projected token and gets one identity.

The controller is the production assembly (see test_k8s_controller); the
waypoint side is the real node join code (node.join: CSR, channel identity
check, credentials on disk) and the real mTLS client. A pod labelled
``veil.io/waypoint=<name>`` in a namespace (or with a Service) that opts in
with ``veil.io/use-waypoint=<name>`` joins as ``waypoint/<ns>/<sa>/<pod>`` and
may obtain exactly ``spiffe://<td>/ns/<ns>/sa/<sa>``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from cryptography import x509

from controller.api.errors import ApiError
from controller.api.model import ResourceType
from controller.api.spiffe import SpiffeId, node_identity, waypoint_channel_identity
from node.credentials import load_node_credentials
from node.join import join, renew_node_certificate, request_certificate

from .apiserver_double import RegisteredToken
from .conftest import ThreadedApiServer, namespace, pod
from .test_k8s_controller import TD, k8s_controller, seed_cluster

pytestmark = pytest.mark.timeout(60)

WP = "shop-waypoint"
WP_POD = "shop-waypoint-7d9f"
PRINCIPAL = f"waypoint/shop/{WP}/{WP_POD}"


def _san(chain_pem: bytes) -> list[str]:
    leaf = x509.load_pem_x509_certificate(chain_pem)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


def seed_waypoint(
    api: ThreadedApiServer,
    *,
    name: str = WP_POD,
    sa: str = WP,
    labels: dict[str, str] | None = None,
    opt_in: str = "namespace",
) -> str:
    """The cluster of seed_cluster plus a waypoint pod with a bound token; returns the token."""
    seed_cluster(api)
    if opt_in == "namespace":
        ns = namespace("shop", "ambient")
        ns["metadata"]["labels"]["veil.io/use-waypoint"] = WP
        api.put("namespaces", ns)
    elif opt_in == "service":
        api.put(
            "services",
            {
                "metadata": {
                    "name": "payments",
                    "namespace": "shop",
                    "labels": {"veil.io/use-waypoint": WP},
                },
                "spec": {"selector": {"app": "payments"}, "ports": [{"port": 8080}]},
            },
        )
    created = api.put(
        "pods",
        pod(
            name,
            "shop",
            "10.1.2.1",
            node="node-b",
            sa=sa,
            labels={"veil.io/waypoint": WP} if labels is None else labels,
        ),
    )
    token = f"token-{name}"
    api.register_token(
        token,
        RegisteredToken(
            username=f"system:serviceaccount:shop:{sa}",
            pod_name=name,
            pod_uid=created["metadata"]["uid"],
            expires_at=time.time() + 3600,
        ),
    )
    return token


async def test_waypoint_pod_joins_and_gets_only_its_own_identity(
    apiserver: ThreadedApiServer, tmp_path: Path
) -> None:
    token = seed_waypoint(apiserver)
    async with k8s_controller(apiserver, tmp_path / "ctl") as served:
        roots = b"".join(served.runtime.ca.trust_bundle().roots)
        state = tmp_path / "wp"
        creds = await join(
            served.join, token, PRINCIPAL, state, mtls_address=served.mtls, ca_pem=roots
        )
        assert creds.identity == waypoint_channel_identity(TD, "shop", WP, WP_POD)
        assert _san(creds.cert_chain_pem[0]) == [str(creds.identity)]
        assert load_node_credentials(state).node == PRINCIPAL

        own = SpiffeId(TD, f"/ns/shop/sa/{WP}")
        _key, chain = await request_certificate(creds, own)
        assert _san(chain[0]) == [str(own)]

        # Never another workload's identity, even one in its namespace; never a
        # node's; never another waypoint's channel identity.
        for other in (
            SpiffeId(TD, "/ns/shop/sa/payments"),
            SpiffeId(TD, "/ns/blog/sa/writer"),
            node_identity(TD, "node-b"),
            waypoint_channel_identity(TD, "shop", WP, "shop-waypoint-other"),
        ):
            with pytest.raises(ApiError) as refused:
                await request_certificate(creds, other)
            assert refused.value.code == "PERMISSION_DENIED", other
            assert "may not obtain" in refused.value.message

        # It renews its channel certificate and watches the registry like a node.
        renewed = await renew_node_certificate(state)
        assert renewed.cert_chain_pem != creds.cert_chain_pem
        async with renewed.client() as client:
            stream = client.watch(node=PRINCIPAL, types=[ResourceType.WORKLOAD])
            snapshot = await asyncio.wait_for(anext(stream), 5)
            assert any(getattr(r, "key", "") == "shop/payments" for r in snapshot.upserts)
            await stream.aclose()

        # The same token cannot claim a node name.
        with pytest.raises(ApiError) as as_node:
            await join(served.join, token, "node-b", tmp_path / "n", ca_pem=roots)
        assert as_node.value.code == "UNAUTHENTICATED"
        assert f"joins as {PRINCIPAL!r}" in as_node.value.message


async def test_waypoint_opt_in_by_service(apiserver: ThreadedApiServer, tmp_path: Path) -> None:
    token = seed_waypoint(apiserver, opt_in="service")
    async with k8s_controller(apiserver, tmp_path / "ctl") as served:
        roots = b"".join(served.runtime.ca.trust_bundle().roots)
        creds = await join(
            served.join, token, PRINCIPAL, tmp_path / "wp", mtls_address=served.mtls, ca_pem=roots
        )
        assert creds.node == PRINCIPAL


@pytest.mark.parametrize(
    ("setup", "code", "fragment"),
    [
        # An ordinary workload's bound token: authenticated, but not a waypoint.
        ("no-label", "PERMISSION_DENIED", "no veil.io/waypoint label"),
        # A waypoint nobody sends traffic to.
        ("not-opted-in", "PERMISSION_DENIED", "labelled veil.io/use-waypoint=shop-waypoint"),
        # The token's service account is not the pod's.
        ("other-sa", "UNAUTHENTICATED", "runs as service account"),
    ],
)
async def test_non_waypoint_tokens_are_refused(
    apiserver: ThreadedApiServer, tmp_path: Path, setup: str, code: str, fragment: str
) -> None:
    if setup == "no-label":
        token = seed_waypoint(apiserver, labels={"app": "payments"})
    elif setup == "not-opted-in":
        token = seed_waypoint(apiserver, opt_in="none")
    else:
        token = seed_waypoint(apiserver)
        apiserver.set(validate_bound_pods=False)
        created = apiserver.get("pods", "shop", WP_POD)
        assert created is not None
        token = "token-stolen-binding"
        apiserver.register_token(
            token,
            RegisteredToken(
                username="system:serviceaccount:shop:checkout",
                pod_name=WP_POD,
                pod_uid=created["metadata"]["uid"],
            ),
        )
    principal = PRINCIPAL if setup != "other-sa" else f"waypoint/shop/checkout/{WP_POD}"
    async with k8s_controller(apiserver, tmp_path / "ctl") as served:
        roots = b"".join(served.runtime.ca.trust_bundle().roots)
        with pytest.raises(ApiError) as err:
            await join(served.join, token, principal, tmp_path / "wp", ca_pem=roots)
        assert err.value.code == code
        assert fragment in err.value.message
        assert not (tmp_path / "wp" / "node-cert.pem").exists()
