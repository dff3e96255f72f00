"""Kubernetes mode end to end: TokenReview joins, node-scoped issuance, Discovery over gRPC,
the CA in a Secret (plugged-in CA first), the trust-bundle ConfigMap, two replicas and the Lease.

The controller side is the production assembly (build_kubernetes_source, the
controller's IdentityService, DiscoveryHub, serving credentials and gRPC API
adapters); nodes use the real client (join_node, ControllerClient). Only the
Kubernetes API is a test double.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.api.client import ControllerClient, join_node
from controller.api.errors import ApiError
from controller.api.model import ResourceType, Workload
from controller.api.spiffe import SpiffeId, node_identity
from controller.discovery import DiscoveryHub
from controller.identity import IdentityService
from controller.k8s import KubernetesOptions, KubernetesRuntime, build_kubernetes_source
from controller.registry import RegistryHolder
from controller.server import SERVING_DNS_NAMES, ServingCredentials
from controller.service import add_services
from node.csr import build_csr, generate_key, key_pem

from .apiserver_double import RegisteredToken
from .conftest import FAST_LEASE, FAST_WATCH, ThreadedApiServer, eventually, namespace, pod

pytestmark = pytest.mark.timeout(60)

TD = "cluster.local"
NODE_SA = "system:serviceaccount:veil-system:veil-node"


@dataclass
class Served:
    runtime: KubernetesRuntime
    holder: RegistryHolder
    join: str
    mtls: str


def options(identity: str) -> KubernetesOptions:
    return KubernetesOptions(
        trust_domain=TD,
        namespace="veil-system",
        identity=identity,
        watch=FAST_WATCH,
        lease=FAST_LEASE,
        ca_check_interval=0.3,
        plugged_ca_interval=0.3,
        startup_poll=0.1,
    )


@contextlib.asynccontextmanager
async def k8s_controller(
    api: ThreadedApiServer, state_dir: Path, identity: str = "ctl-1"
) -> AsyncIterator[Served]:
    """What ``veil controller run --source kubernetes`` wires, on loopback ports."""
    holder = RegistryHolder(trust_domain=TD)
    runtime = await asyncio.wait_for(
        build_kubernetes_source(
            holder, options(identity), state_dir=state_dir, client_factory=api.client
        ),
        20,
    )
    task = asyncio.create_task(runtime.run())
    server: grpc.aio.Server | None = None
    hub = DiscoveryHub()
    try:
        await asyncio.wait_for(runtime.wait_synced(), 10)
        hub.set_trust_bundle(runtime.ca.trust_bundle())
        hub.publish(holder.current())
        holder.subscribe(hub.publish)
        identity_service = IdentityService(
            runtime.ca,
            runtime.authenticator,
            holder.current,
            default_ttl=timedelta(hours=1),
            max_ttl=timedelta(hours=1),
            node_cert_ttl=timedelta(hours=1),
        )
        serving = ServingCredentials(
            runtime.ca, SERVING_DNS_NAMES, ["127.0.0.1"], timedelta(hours=1)
        )
        server = grpc.aio.server()
        add_services(server, identity_service, hub)
        mtls = server.add_secure_port("127.0.0.1:0", serving.credentials(client_auth=True))
        join = server.add_secure_port("127.0.0.1:0", serving.credentials(client_auth=False))
        await server.start()
        yield Served(runtime, holder, f"127.0.0.1:{join}", f"127.0.0.1:{mtls}")
    finally:
        if server is not None:
            await server.stop(0)
        hub.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runtime.close()


def node_pod(name: str, node: str) -> dict[str, object]:
    obj = pod(name, "veil-system", f"192.168.0.{ord(node[-1]) - 96}", node=node, sa="veil-node")
    obj["spec"]["hostNetwork"] = True  # type: ignore[index]
    return obj


def seed_cluster(api: ThreadedApiServer) -> dict[str, str]:
    """Two nodes with a Veil node pod each; shop is ambient. Returns node -> token."""
    api.put("namespaces", namespace("veil-system", "none"))
    api.put("namespaces", namespace("shop", "ambient"))
    api.put("namespaces", namespace("blog"))
    api.put("pods", pod("checkout", "shop", "10.1.0.1", node="node-a", sa="checkout"))
    api.put("pods", pod("payments", "shop", "10.1.1.1", node="node-b", sa="payments"))
    api.put("pods", pod("writer", "blog", "10.1.0.2", node="node-a", sa="writer"))
    tokens = {}
    for node in ("node-a", "node-b"):
        created = api.put("pods", node_pod(f"veil-node-{node[-1]}", node))
        tokens[node] = f"token-{node}"
        api.register_token(
            tokens[node],
            RegisteredToken(
                username=NODE_SA,
                pod_name=created["metadata"]["name"],
                pod_uid=created["metadata"]["uid"],
                expires_at=time.time() + 3600,
            ),
        )
    return tokens


def configmap_roots(api: ThreadedApiServer) -> bytes | None:
    cm = api.get("configmaps", "veil-system", "veil-ca-root")
    return None if cm is None else cm["data"]["root-cert.pem"].encode()


async def join(served: Served, root_pem: bytes, token: str, node: str) -> ControllerClient:
    key = generate_key()
    result = await join_node(
        served.join, root_pem, token, node, build_csr(key, node_identity(TD, node))
    )
    return ControllerClient(
        served.mtls,
        key_pem=key_pem(key),
        cert_chain_pem=b"".join(result.cert_chain),
        trust_bundle_pem=b"".join(result.trust_bundle),
    )


async def svid(client: ControllerClient, sa: str, ns: str = "shop") -> tuple[bytes, ...]:
    identity = SpiffeId(TD, f"/ns/{ns}/sa/{sa}")
    return await client.create_certificate(build_csr(generate_key(), identity), str(identity))


async def test_node_token_joins_and_issuance_is_node_scoped(
    apiserver: ThreadedApiServer, tmp_path: Path
) -> None:
    tokens = seed_cluster(apiserver)
    async with k8s_controller(apiserver, tmp_path) as served:
        # The node pins the CA from the public ConfigMap the leader published.
        await eventually(
            lambda: configmap_roots(apiserver) is not None, what="trust bundle ConfigMap"
        )
        roots = configmap_roots(apiserver)
        assert roots == b"".join(served.runtime.ca.trust_bundle().roots)

        node_a = await join(served, roots or b"", tokens["node-a"], "node-a")
        async with node_a:
            chain = await svid(node_a, "checkout")  # checkout runs on node-a
            leaf = x509.load_pem_x509_certificate(chain[0])
            assert leaf.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier) == [
                f"spiffe://{TD}/ns/shop/sa/checkout"
            ]
            # payments runs only on node-b: node-a's token cannot get its identity.
            with pytest.raises(ApiError) as refused:
                await svid(node_a, "payments")
            assert refused.value.code == "PERMISSION_DENIED"

            # Discovery over gRPC: enrolling blog by label reaches node-a as workloads.
            stream = node_a.watch(node="node-a", types=[ResourceType.WORKLOAD])
            snapshot = await asyncio.wait_for(anext(stream), 5)
            seen = {r.key: r for r in snapshot.upserts if isinstance(r, Workload)}
            assert seen["shop/checkout"].enrolled and not seen["blog/writer"].enrolled
            apiserver.put("namespaces", namespace("blog", "ambient"))
            update = await asyncio.wait_for(anext(stream), 5)
            (writer,) = [r for r in update.upserts if isinstance(r, Workload)]
            assert writer.key == "blog/writer" and writer.enrolled
            await stream.aclose()

        # node-a's token cannot join as node-b.
        with pytest.raises(ApiError) as wrong_node:
            await join(served, roots or b"", tokens["node-a"], "node-b")
        assert wrong_node.value.code == "UNAUTHENTICATED"
        assert "node node-a, not node node-b" in wrong_node.value.message


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("expired", "service account token has expired"),
        ("garbage", "invalid bearer token"),
        ("audience", "invalid for the target audiences"),
        ("other-sa", "not the Veil node service account"),
        ("unbound", "not bound to a pod"),
        ("pod-gone", "no longer exists"),
    ],
)
async def test_bad_tokens_are_refused_with_the_reason(
    apiserver: ThreadedApiServer, tmp_path: Path, setup: str, fragment: str
) -> None:
    seed_cluster(apiserver)
    pod_a = apiserver.get("pods", "veil-system", "veil-node-a")
    assert pod_a is not None
    bound = {"pod_name": "veil-node-a", "pod_uid": pod_a["metadata"]["uid"]}
    token = f"bad-{setup}"
    if setup == "expired":
        apiserver.register_token(
            token, RegisteredToken(NODE_SA, expires_at=time.time() - 1, **bound)
        )
    elif setup == "audience":
        apiserver.register_token(
            token, RegisteredToken(NODE_SA, audiences=("https://kubernetes.default.svc",), **bound)
        )
    elif setup == "other-sa":
        # A real token of another account (bound to one of its pods, elsewhere).
        apiserver.set(validate_bound_pods=False)
        apiserver.register_token(
            token, RegisteredToken("system:serviceaccount:shop:checkout", **bound)
        )
    elif setup == "unbound":
        apiserver.register_token(token, RegisteredToken(NODE_SA))
    elif setup == "pod-gone":
        # The API server would invalidate the token itself; the controller checks too.
        apiserver.set(validate_bound_pods=False)
        apiserver.register_token(token, RegisteredToken(NODE_SA, **bound))
        apiserver.delete("pods", "veil-system", "veil-node-a")
    async with k8s_controller(apiserver, tmp_path) as served:
        roots = b"".join(served.runtime.ca.trust_bundle().roots)
        with pytest.raises(ApiError) as err:
            await join(served, roots, token, "node-a")
        assert err.value.code == "UNAUTHENTICATED"
        assert fragment in err.value.message


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    path_length: int,
) -> x509.Certificate:
    now = datetime.now(UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


async def test_plugged_in_ca_secret_takes_precedence(
    apiserver: ThreadedApiServer, tmp_path: Path
) -> None:
    seed_cluster(apiserver)
    root_key, int_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    root = _ca_cert("Corp Root", root_key, None, 1)
    intermediate = _ca_cert("Corp Mesh CA", int_key, ("Corp Root", root_key), 0)
    key_bytes = int_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    apiserver.put(
        "secrets",
        {
            "metadata": {"name": "cacerts", "namespace": "veil-system"},
            "data": {
                "ca-cert.pem": b64(_pem(intermediate)),
                "ca-key.pem": b64(key_bytes),
                "root-cert.pem": b64(_pem(root)),
                "cert-chain.pem": b64(_pem(intermediate) + _pem(root)),
            },
        },
    )
    async with k8s_controller(apiserver, tmp_path) as served:
        root_fp = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
        assert served.runtime.ca.fingerprint == root_fp
        assert served.runtime.ca.trust_bundle().roots == (_pem(root),)
        # The CA state went to the veil-ca Secret; nodes see only the public root.
        stored = apiserver.get("secrets", "veil-system", "veil-ca")
        assert stored is not None and "ca.json" in stored["data"]
        await eventually(lambda: configmap_roots(apiserver) == _pem(root))
        tokens = {"node-a": "token-node-a"}
        node_a = await join(served, _pem(root), tokens["node-a"], "node-a")
        async with node_a:
            chain = await svid(node_a, "checkout")
        # leaf, the plugged-in intermediate, the root
        assert x509.load_pem_x509_certificate(chain[1]).subject == intermediate.subject


async def test_two_replicas_share_one_ca_and_one_leader(
    apiserver: ThreadedApiServer, tmp_path: Path
) -> None:
    seed_cluster(apiserver)
    async with k8s_controller(apiserver, tmp_path / "1", "ctl-1") as first:
        await eventually(lambda: first.runtime.elector.is_leader, what="first replica leads")
        async with k8s_controller(apiserver, tmp_path / "2", "ctl-2") as second:
            assert second.runtime.ca.fingerprint == first.runtime.ca.fingerprint
            await asyncio.sleep(0.5)
            assert first.runtime.elector.is_leader and not second.runtime.elector.is_leader
            # The standby serves nodes too, with the same CA.
            roots = b"".join(second.runtime.ca.trust_bundle().roots)
            node_b = await join(second, roots, "token-node-b", "node-b")
            async with node_b:
                await svid(node_b, "payments")
            # A CA rotation by the leader reaches the standby through the Secret.
            await asyncio.to_thread(first.runtime.ca.rotate)
            await eventually(
                lambda: len(second.runtime.ca.trust_bundle().roots) == 2, what="standby reloads CA"
            )
            await eventually(
                lambda: (
                    configmap_roots(apiserver) == b"".join(first.runtime.ca.trust_bundle().roots)
                )
            )
            # The leader stops: it releases the Lease and the standby takes over at once.
            await first.runtime.close()
            started = time.monotonic()
            await eventually(lambda: second.runtime.elector.is_leader, timeout=3, what="takeover")
            assert time.monotonic() - started < FAST_LEASE.lease_duration
            lease = apiserver.get("leases", "veil-system", "veil-controller")
            assert lease is not None and lease["spec"]["holderIdentity"] == "ctl-2"
            assert lease["spec"]["leaseTransitions"] >= 1


async def test_standby_waits_for_the_leader_to_create_the_ca(
    apiserver: ThreadedApiServer, tmp_path: Path
) -> None:
    seed_cluster(apiserver)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    apiserver.put(
        "leases",
        {
            "metadata": {"name": "veil-controller", "namespace": "veil-system"},
            "spec": {
                "holderIdentity": "someone-else",
                "leaseDurationSeconds": 30,
                "renewTime": now,
            },
        },
    )
    holder = RegistryHolder(trust_domain=TD)
    starting = asyncio.create_task(
        build_kubernetes_source(
            holder, options("ctl-1"), state_dir=tmp_path, client_factory=apiserver.client
        )
    )
    await asyncio.sleep(1.0)
    assert not starting.done()
    assert apiserver.get("secrets", "veil-system", "veil-ca") is None  # a standby never creates it
    # The other leader goes away (releases the Lease): we lead and create the CA.
    lease = apiserver.get("leases", "veil-system", "veil-controller")
    assert lease is not None
    lease["spec"]["holderIdentity"] = ""
    apiserver.put("leases", lease)
    runtime = await asyncio.wait_for(starting, 10)
    try:
        assert runtime.elector.is_leader
        assert apiserver.get("secrets", "veil-system", "veil-ca") is not None
    finally:
        await runtime.close()
