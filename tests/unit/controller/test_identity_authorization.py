"""Node-scoped issuance: pure decisions (tables) and the IdentityService without sockets."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from controller.api.errors import ApiError
from controller.api.model import RegistryState, Workload
from controller.api.spiffe import SpiffeId
from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from controller.errors import ControllerError
from controller.identity import (
    IdentityService,
    authorize_identity,
    effective_ttl,
    parse_requested_identity,
    workload_index,
)

TD = "cluster.local"
STATE = RegistryState(
    trust_domain=TD,
    workloads=(
        Workload("cart-1", "shop", "cart", "node-1", ("10.1.0.5",), enrolled=True),
        Workload("pay-1", "shop", "payments", "node-2", ("10.2.0.5",), enrolled=True),
        Workload("cart-2", "shop", "cart", "node-2", ("10.2.0.6",), enrolled=True),
    ),
)
INDEX = workload_index(STATE)


@pytest.mark.parametrize(
    ("node", "identity", "allowed"),
    [
        ("node-1", "spiffe://cluster.local/ns/shop/sa/cart", True),
        ("node-2", "spiffe://cluster.local/ns/shop/sa/cart", True),
        ("node-2", "spiffe://cluster.local/ns/shop/sa/payments", True),
        ("node-1", "spiffe://cluster.local/ns/shop/sa/payments", False),  # workload on another node
        ("node-3", "spiffe://cluster.local/ns/shop/sa/cart", False),  # node runs nothing
        ("node-1", "spiffe://cluster.local/ns/other/sa/cart", False),  # same sa, other namespace
        ("node-1", "spiffe://cluster.local/veil/node/node-1", True),  # renew own node identity
        ("node-1", "spiffe://cluster.local/veil/node/node-2", False),  # another node's identity
    ],
)
def test_authorize_identity(node: str, identity: str, allowed: bool) -> None:
    sid = SpiffeId.parse(identity)
    if allowed:
        authorize_identity(INDEX, node, sid)
        return
    with pytest.raises(ApiError) as e:
        authorize_identity(INDEX, node, sid)
    assert e.value.code == "PERMISSION_DENIED"
    assert repr(node) in e.value.message and identity in e.value.message


@pytest.mark.parametrize(
    ("identity", "needle"),
    [
        ("spiffe://cluster.local/ns/shop/sa/cart", None),
        ("spiffe://cluster.local/veil/node/n1", None),
        ("spiffe://example.org/ns/shop/sa/cart", "trust domain"),
        ("spiffe://cluster.local/ns/shop", "not a workload identity"),
        ("spiffe://cluster.local", "not a workload identity"),
        ("spiffe://cluster.local/ns/shop/sa/cart/x", "not a workload identity"),
        ("http://cluster.local/ns/shop/sa/cart", "invalid"),
        ("", "invalid"),
        ("spiffe://cluster.local/ns/../sa/cart", "invalid"),
    ],
)
def test_parse_requested_identity(identity: str, needle: str | None) -> None:
    if needle is None:
        assert str(parse_requested_identity(identity, TD)) == identity
        return
    with pytest.raises(ApiError) as e:
        parse_requested_identity(identity, TD)
    assert e.value.code == "INVALID_ARGUMENT" and needle in e.value.message


H = timedelta(hours=1)


@pytest.mark.parametrize(
    ("requested", "default", "maximum", "want", "clamped"),
    [
        (0, 24 * H, 24 * H, 24 * H, False),
        (3600, 24 * H, 24 * H, H, False),
        (48 * 3600, 24 * H, 24 * H, 24 * H, True),
        (0, 48 * H, 24 * H, 24 * H, True),
        (1, 24 * H, 24 * H, timedelta(seconds=1), False),
    ],
)
def test_effective_ttl(
    requested: int, default: timedelta, maximum: timedelta, want: timedelta, clamped: bool
) -> None:
    assert effective_ttl(requested, default, maximum) == (want, clamped)


def test_negative_ttl_is_invalid() -> None:
    with pytest.raises(ApiError) as e:
        effective_ttl(-1, H, H)
    assert e.value.code == "INVALID_ARGUMENT"


# ----- the service, called directly --------------------------------------------


@pytest.fixture
def service(tmp_path: Path, ca: CertificateAuthority) -> tuple[IdentityService, JoinTokenStore]:
    tokens = JoinTokenStore(tmp_path / "ctl", ca_fingerprint=lambda: ca.fingerprint)
    svc = IdentityService(
        ca, tokens, lambda: STATE, default_ttl=2 * H, max_ttl=4 * H, node_cert_ttl=8 * H
    )
    return svc, tokens


def _lifetime(pem: bytes) -> timedelta:
    c = x509.load_pem_x509_certificate(pem)
    return c.not_valid_after_utc - c.not_valid_before_utc - timedelta(minutes=1)


async def test_create_certificate_defaults_and_clamps(service: Any, csr_factory: Any) -> None:
    svc, _ = service
    sid = "spiffe://cluster.local/ns/shop/sa/cart"
    _, csr = csr_factory(sid)
    assert _lifetime((await svc.create_certificate("node-1", csr, sid, 0))[0]) == 2 * H
    assert _lifetime((await svc.create_certificate("node-1", csr, sid, 3600))[0]) == H
    assert _lifetime((await svc.create_certificate("node-1", csr, sid, 99 * 3600))[0]) == 4 * H


async def test_create_certificate_refuses_a_workload_of_another_node(
    service: Any, csr_factory: Any
) -> None:
    svc, _ = service
    sid = "spiffe://cluster.local/ns/shop/sa/payments"
    _, csr = csr_factory(sid)
    with pytest.raises(ApiError) as e:
        await svc.create_certificate("node-1", csr, sid, 0)
    assert e.value.code == "PERMISSION_DENIED"


async def test_a_csr_naming_the_node_cannot_obtain_a_workload_identity(
    service: Any, csr_factory: Any
) -> None:
    svc, _ = service
    _, csr = csr_factory("spiffe://cluster.local/veil/node/node-1")
    with pytest.raises(ApiError) as e:
        await svc.create_certificate("node-1", csr, "spiffe://cluster.local/ns/shop/sa/cart", 0)
    assert e.value.code == "INVALID_ARGUMENT" and "differs" in e.value.message


async def test_registry_changes_take_effect_immediately(
    tmp_path: Path, ca: CertificateAuthority, csr_factory: Any
) -> None:
    current = [STATE]
    svc = IdentityService(ca, JoinTokenStore(tmp_path), lambda: current[0])
    sid = "spiffe://cluster.local/ns/shop/sa/cart"
    _, csr = csr_factory(sid)
    await svc.create_certificate("node-1", csr, sid, 0)
    current[0] = RegistryState(trust_domain=TD, workloads=STATE.workloads[1:])  # cart-1 gone
    with pytest.raises(ApiError) as e:
        await svc.create_certificate("node-1", csr, sid, 0)
    assert e.value.code == "PERMISSION_DENIED"


async def test_join_node_issues_a_node_certificate(service: Any, csr_factory: Any) -> None:
    svc, tokens = service
    token = tokens.create("node-1", H)
    _, csr = csr_factory("spiffe://cluster.local/veil/node/node-1")
    result = await svc.join_node(token, csr, "node-1")
    assert result.node == "node-1" and result.trust_domain == TD
    assert len(result.trust_bundle) == 1
    assert _lifetime(result.cert_chain[0]) == 8 * H


async def test_join_with_a_bad_csr_does_not_spend_the_token(service: Any, csr_factory: Any) -> None:
    svc, tokens = service
    token = tokens.create("node-1", H)
    _, wrong = csr_factory("spiffe://cluster.local/veil/node/node-2")
    with pytest.raises(ApiError) as e:
        await svc.join_node(token, wrong, "node-1")
    assert e.value.code == "INVALID_ARGUMENT"
    _, good = csr_factory("spiffe://cluster.local/veil/node/node-1")
    assert (await svc.join_node(token, good, "node-1")).node == "node-1"


async def test_join_with_an_invalid_node_name(service: Any, csr_factory: Any) -> None:
    svc, tokens = service
    _, csr = csr_factory("spiffe://cluster.local/veil/node/node-1")
    with pytest.raises(ApiError) as e:
        await svc.join_node(tokens.create("node-1", H), csr, "Node/1")
    assert e.value.code == "INVALID_ARGUMENT"


def test_ttl_configuration_is_validated(tmp_path: Path, ca: CertificateAuthority) -> None:
    with pytest.raises(ControllerError, match="exceeds the maximum"):
        IdentityService(ca, JoinTokenStore(tmp_path), lambda: STATE, default_ttl=2 * H, max_ttl=H)
    with pytest.raises(ControllerError, match="positive"):
        IdentityService(ca, JoinTokenStore(tmp_path), lambda: STATE, node_cert_ttl=timedelta(0))
