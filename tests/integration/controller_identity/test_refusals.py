"""What the controller refuses over the real gRPC listeners, with which status and reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controller.api.client import ControllerClient, join_node
from controller.api.errors import ApiError
from controller.api.spiffe import SpiffeId, node_identity
from controller.auth import JoinTokenStore
from node import NodeCredentials, build_csr, generate_key, join, request_certificate
from node.errors import NodeCredentialsError

CART = "spiffe://cluster.local/ns/shop/sa/cart"  # runs on node-1
PAYMENTS = "spiffe://cluster.local/ns/shop/sa/payments"  # runs on node-2


def csr(sans: list[x509.GeneralName], key: Any = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def uri(u: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(u)


def tampered_csr(identity: str) -> bytes:
    der = bytearray(
        x509.load_pem_x509_csr(csr([uri(identity)])).public_bytes(serialization.Encoding.DER)
    )
    i = der.find(b"cart")
    der[i] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
async def node1(controller: Any, tmp_path: Path) -> NodeCredentials:
    return await join(
        controller.join_address,
        controller.tokens.create("node-1"),
        "node-1",
        tmp_path / "n1",
        mtls_address=controller.mtls_address,
    )


async def _create(creds: NodeCredentials, csr_pem: bytes, identity: str) -> ApiError:
    async with creds.client() as client:
        with pytest.raises(ApiError) as e:
            await client.create_certificate(csr_pem, identity)
    return e.value


async def test_workload_on_another_node_is_permission_denied(node1: NodeCredentials) -> None:
    with pytest.raises(ApiError) as e:
        await request_certificate(node1, SpiffeId.parse(PAYMENTS))
    assert e.value.code == "PERMISSION_DENIED"
    assert "'node-1'" in e.value.message and PAYMENTS in e.value.message


@pytest.mark.parametrize(
    ("name", "make", "identity", "needle"),
    [
        ("tampered csr", lambda: tampered_csr(CART), CART, "signature"),
        ("rsa key", lambda: csr([uri(CART)], rsa.generate_private_key(65537, 2048)), CART, "P-256"),
        (
            "p-384 key",
            lambda: csr([uri(CART)], ec.generate_private_key(ec.SECP384R1())),
            CART,
            "P-256",
        ),
        ("several sans", lambda: csr([uri(CART), uri(CART + "x")]), CART, "exactly one URI SAN"),
        (
            "dns san added",
            lambda: csr([uri(CART), x509.DNSName("cart")]),
            CART,
            "exactly one URI SAN",
        ),
        (
            "san differs",
            lambda: csr([uri("spiffe://cluster.local/ns/shop/sa/cartx")]),
            CART,
            "differs",
        ),
        (
            "invalid id",
            lambda: csr([uri(CART)]),
            "spiffe://cluster.local/ns/shop/sa/../cart",
            "invalid",
        ),
        (
            "not spiffe",
            lambda: csr([uri(CART)]),
            "https://cluster.local/ns/shop/sa/cart",
            "invalid",
        ),
        (
            "other trust domain",
            lambda: csr([uri(CART)]),
            "spiffe://evil.org/ns/shop/sa/cart",
            "trust domain",
        ),
        (
            "not a workload id",
            lambda: csr([uri(CART)]),
            "spiffe://cluster.local/admin",
            "not a workload",
        ),
        ("no csr", lambda: b"", CART, "no CSR"),
    ],
)
async def test_bad_requests_are_invalid_argument(
    node1: NodeCredentials, name: str, make: Any, identity: str, needle: str
) -> None:
    err = await _create(node1, make(), identity)
    assert err.code == "INVALID_ARGUMENT", (name, err)
    assert needle in err.message, (name, err.message)


async def test_node_certificate_cannot_become_a_workload_identity(
    node1: NodeCredentials, controller: Any
) -> None:
    # The node cert's identity is not a workload principal at all.
    leaf = x509.load_pem_x509_certificate(node1.cert_chain_pem[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    sid = SpiffeId.parse(san.get_values_for_type(x509.UniformResourceIdentifier)[0])
    assert sid.workload is None and sid.node == "node-1"
    # Its key cannot be re-certified as a workload: the CSR must name the workload...
    key = generate_key()
    err = await _create(node1, build_csr(key, node1.identity), CART)
    assert err.code == "INVALID_ARGUMENT" and "differs" in err.message
    # ...and another node's identity is never issued.
    other = node_identity("cluster.local", "node-2")
    err = await _create(node1, build_csr(key, other), str(other))
    assert err.code == "PERMISSION_DENIED"


async def test_a_workload_certificate_is_not_a_node_credential(
    node1: NodeCredentials, controller: Any
) -> None:
    key, chain = await request_certificate(node1, SpiffeId.parse(CART))
    client = ControllerClient(
        controller.mtls_address,
        key_pem=key,
        cert_chain_pem=b"".join(chain),
        trust_bundle_pem=b"".join(node1.trust_bundle_pem),
    )
    async with client:
        with pytest.raises(ApiError) as e:
            await client.create_certificate(csr([uri(CART)]), CART)
    assert e.value.code == "PERMISSION_DENIED" and "not a node identity" in e.value.message


async def test_own_node_certificate_can_be_renewed(node1: NodeCredentials, tmp_path: Path) -> None:
    from node import renew_node_certificate

    renewed = await renew_node_certificate(tmp_path / "n1")
    assert renewed.key_pem != node1.key_pem
    assert renewed.identity == node1.identity
    # The renewed credentials work for the next call.
    await request_certificate(renewed, SpiffeId.parse(CART))


async def _raw_join(controller: Any, token: str, node: str = "node-1") -> ApiError:
    root = controller.ca.trust_bundle().roots[0]
    key = generate_key()
    with pytest.raises(ApiError) as e:
        await join_node(
            controller.join_address,
            root,
            token,
            node,
            build_csr(key, node_identity("cluster.local", node)),
        )
    return e.value


async def test_reused_token_is_unauthenticated(controller: Any, tmp_path: Path) -> None:
    token = controller.tokens.create("node-1")
    await join(controller.join_address, token, "node-1", tmp_path / "n1")
    err = await _raw_join(controller, token)
    assert err.code == "UNAUTHENTICATED" and "already used" in err.message


async def test_expired_token_is_unauthenticated(controller: Any) -> None:
    # Created two hours ago (as the CLI would have), valid for one hour.
    earlier = JoinTokenStore(
        controller.state_dir, clock=lambda: datetime.now(UTC) - timedelta(hours=2)
    )
    token = earlier.create("node-1", timedelta(hours=1), ca_fingerprint=controller.ca.fingerprint)
    err = await _raw_join(controller, token)
    assert err.code == "UNAUTHENTICATED" and "expired" in err.message


@pytest.mark.parametrize("field", [1, 2])
async def test_tampered_token_is_unauthenticated(controller: Any, field: int) -> None:
    token = controller.tokens.create("node-1")
    parts = token.split(".")
    parts[field] = ("0" if parts[field][0] != "0" else "1") + parts[field][1:]
    err = await _raw_join(controller, ".".join(parts))
    # A known id with a wrong secret says so; an unknown id is not recognised.
    needle = "not recognised" if field == 1 else "invalid secret"
    assert err.code == "UNAUTHENTICATED" and needle in err.message


async def test_token_for_another_node_is_unauthenticated(controller: Any) -> None:
    token = controller.tokens.create("node-2")
    err = await _raw_join(controller, token, "node-1")
    assert err.code == "UNAUTHENTICATED" and "issued for node 'node-2'" in err.message


async def test_token_with_a_wrong_ca_fingerprint_fails_pinning(
    controller: Any, tmp_path: Path
) -> None:
    token = controller.tokens.create("node-1")
    forged = ".".join([*token.split(".")[:3], "00" * 32])
    with pytest.raises(NodeCredentialsError, match="matches the CA fingerprint"):
        await join(controller.join_address, forged, "node-1", tmp_path / "n1")
    assert not (tmp_path / "n1" / "node-key.pem").exists()


async def test_create_certificate_needs_mutual_tls(controller: Any, node1: NodeCredentials) -> None:
    # The join listener does not ask for a client certificate, so even a node that
    # has one is unauthenticated there: CreateCertificate works only over mTLS.
    client = ControllerClient(
        controller.join_address,
        key_pem=node1.key_pem,
        cert_chain_pem=b"".join(node1.cert_chain_pem),
        trust_bundle_pem=b"".join(node1.trust_bundle_pem),
    )
    async with client:
        with pytest.raises(ApiError) as e:
            await client.create_certificate(csr([uri(CART)]), CART)
    assert e.value.code == "UNAUTHENTICATED" and "mutual TLS" in e.value.message
