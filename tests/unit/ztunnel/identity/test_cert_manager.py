"""CertManager against the controller's real CA and IdentityService, in virtual time.

The controller side is the real ``controller.identity.IdentityService`` over a
real ``controller.ca.CertificateAuthority``, called as a node exactly as the
gRPC adapter does after mTLS; only the transport is left out. Time is a manual
clock shared by the CA and the manager, so a day of rotations takes
milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.api.model import RegistryState, TrustBundle, WatchUpdate, Workload
from controller.api.spiffe import SpiffeId
from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from controller.identity import IdentityService
from node.state import StateStore
from ztunnel.errors import CertificateError
from ztunnel.identity import (
    CertManager,
    WorkloadCertificate,
    build_csr,
    chain_still_trusted,
    generate_key,
    verify_issued,
)

NODE = "node-a"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


class ManualClock:
    """Virtual time: ``sleep`` waits until a test calls ``advance`` past its deadline."""

    def __init__(self, start: datetime) -> None:
        self.t = start
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + timedelta(seconds=seconds), next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        target = self.t + timedelta(seconds=seconds)
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self.t = max(self.t, deadline)
            if not fut.done():
                fut.set_result(None)
            await settle()
        self.t = target
        await settle()


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


class NodeSigner:
    """The controller's IdentityBackend called as one node (what the gRPC adapter does)."""

    def __init__(self, backend: IdentityService, node: str) -> None:
        self.backend = backend
        self.node = node
        self.calls = 0

    async def create_certificate(
        self, csr_pem: bytes, identity: str, ttl_seconds: int = 0, timeout: float = 10.0
    ) -> tuple[bytes, ...]:
        self.calls += 1
        await asyncio.sleep(0)  # a real RPC yields; concurrent callers interleave here
        return await self.backend.create_certificate(self.node, csr_pem, identity, ttl_seconds)


def wl(name: str, sa: str, node: str = NODE) -> Workload:
    return Workload(name, "default", sa, node, (f"10.0.1.{len(name)}",), enrolled=True)


def ident(sa: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://cluster.local/ns/default/sa/{sa}")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.clock = ManualClock(T0)
        self.ca = CertificateAuthority.load_or_create(tmp / "ca", clock=self.clock.now)
        self.registry = RegistryState(workloads=(wl("a", "alpha"), wl("b", "beta")))
        self.identity = IdentityService(
            self.ca,
            JoinTokenStore(tmp / "ca"),
            lambda: self.registry,
            default_ttl=timedelta(hours=1),
            max_ttl=timedelta(hours=24),
        )
        self.signer = NodeSigner(self.identity, NODE)

    def manager(self, **kw: object) -> CertManager:
        kw.setdefault("clock", self.clock)
        kw.setdefault("retry_initial", 1.0)
        kw.setdefault("retry_max", 60.0)
        return CertManager(self.signer, self.ca.trust_bundle, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    yield Env(tmp_path)


@pytest.fixture
async def manager(env: Env) -> AsyncIterator[CertManager]:
    m = env.manager()
    try:
        yield m
    finally:
        await m.close()


def leaf_of(cert: WorkloadCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert.chain_pem[0])


async def test_fetch_issues_a_verified_certificate(env: Env, manager: CertManager) -> None:
    cert = await manager.fetch(ident("alpha"), timeout=5)
    leaf = leaf_of(cert)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [str(ident("alpha"))]
    key = serialization.load_pem_private_key(cert.key_pem, None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
    assert cert.not_after - T0 == timedelta(hours=1)
    assert cert.serial == leaf.serial_number
    assert manager.get(ident("alpha")) is cert
    assert manager.get(ident("beta")) is None
    assert "key_pem" not in repr(cert)
    (status,) = manager.statuses()
    assert status.state == "valid" and status.failures == 0
    dump = manager.dump()
    assert dump[0]["serial"] == cert.serial_hex and dump[0]["identity"] == str(ident("alpha"))
    assert "PRIVATE KEY" not in str(dump)
    assert env.signer.calls == 1


async def test_concurrent_fetches_share_one_request(env: Env, manager: CertManager) -> None:
    certs = await asyncio.gather(*(manager.fetch(ident("alpha"), timeout=5) for _ in range(10)))
    assert len({c.serial for c in certs}) == 1
    assert env.signer.calls == 1


async def test_rotation_at_half_life_with_a_new_key(env: Env, manager: CertManager) -> None:
    first = await manager.fetch(ident("alpha"), timeout=5)
    assert first.rotation_due == T0 + timedelta(minutes=30)
    await env.clock.advance(29 * 60)
    assert manager.get(ident("alpha")) is first
    await env.clock.advance(2 * 60)
    second = manager.get(ident("alpha"))
    assert second is not None and second.serial != first.serial
    assert second.key_pem != first.key_pem
    assert second.not_after == T0 + timedelta(minutes=30) + timedelta(hours=1)
    # A day of rotations: one per half-life, never a burst.
    await env.clock.advance(24 * 3600)
    assert 45 <= env.signer.calls <= 51


async def test_failure_keeps_the_old_certificate_until_it_expires(
    env: Env, manager: CertManager
) -> None:
    first = await manager.fetch(ident("alpha"), timeout=5)
    # The workload leaves the registry: the controller now refuses (PERMISSION_DENIED).
    env.registry = RegistryState(workloads=(wl("b", "beta"),))
    await env.clock.advance(31 * 60)
    (status,) = manager.statuses()
    assert status.failures >= 1
    assert status.last_error is not None and "may not obtain" in status.last_error
    assert manager.get(ident("alpha")) is first  # still served
    # Retries back off, capped at retry_max (60 s) plus nothing more.
    assert status.next_attempt_at is not None
    assert status.next_attempt_at - env.clock.now() <= timedelta(seconds=60)
    calls = env.signer.calls
    await env.clock.advance(20 * 60)
    made = env.signer.calls - calls
    assert 20 <= made <= 40  # ~one per minute once capped, never a hot loop
    assert manager.get(ident("alpha")) is first
    # Past notAfter the expired certificate is dropped.
    await env.clock.advance(10 * 60)
    assert manager.get(ident("alpha")) is None
    assert manager.statuses()[0].state in ("pending", "expired")
    # The workload comes back: the next retry succeeds.
    env.registry = RegistryState(workloads=(wl("a", "alpha"),))
    await env.clock.advance(61)
    again = manager.get(ident("alpha"))
    assert again is not None and again.serial != first.serial
    assert manager.statuses()[0].failures == 0 and manager.statuses()[0].last_error is None


async def test_fetch_fails_fast_when_the_controller_refuses(env: Env, manager: CertManager) -> None:
    with pytest.raises(CertificateError, match="may not obtain"):
        await manager.fetch(ident("gamma"), timeout=5)


async def test_fetch_without_a_trust_bundle_fails(env: Env) -> None:
    m = CertManager(env.signer, lambda: None, clock=env.clock)
    try:
        with pytest.raises(CertificateError, match="no trust bundle"):
            await m.fetch(ident("alpha"), timeout=5)
    finally:
        await m.close()


async def test_prefetch_follows_the_state_store(env: Env, manager: CertManager) -> None:
    store = StateStore(NODE)
    store.subscribe(manager.on_state_change)
    store.apply(
        WatchUpdate(
            "e", 1, True, (wl("a", "alpha"), wl("b", "beta"), wl("r", "remote", node="node-b"))
        )
    )
    await settle()
    assert manager.tracked() == {ident("alpha"), ident("beta")}
    assert manager.has_all(store.current.local_identities())
    store.apply(WatchUpdate("e", 2, False, (), ((2, "default/b"),)))  # type: ignore[arg-type]
    await settle()
    assert manager.tracked() == {ident("alpha")}
    assert manager.get(ident("beta")) is None


async def test_answer_not_chaining_to_the_bundle_is_refused(env: Env, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other", clock=env.clock.now)
    m = CertManager(env.signer, other.trust_bundle, clock=env.clock)
    try:
        with pytest.raises(CertificateError, match="does not chain"):
            await m.fetch(ident("alpha"), timeout=5)
    finally:
        await m.close()


def test_verify_issued_rejects_wrong_san_and_wrong_key(env: Env) -> None:
    key = generate_key()
    chain = env.ca.sign_csr(build_csr(key, ident("alpha")), ident("alpha"), timedelta(hours=1))
    bundle = env.ca.trust_bundle()
    ok = verify_issued(chain, ident("alpha"), key, bundle, T0)
    assert ok.identity == ident("alpha") and ok.received_at == T0
    with pytest.raises(CertificateError, match="asked for exactly"):
        verify_issued(chain, ident("beta"), key, bundle, T0)
    with pytest.raises(CertificateError, match="does not certify the key"):
        verify_issued(chain, ident("alpha"), generate_key(), bundle, T0)
    with pytest.raises(CertificateError, match="not valid now"):
        verify_issued(chain, ident("alpha"), key, bundle, T0 + timedelta(hours=2))
    assert chain_still_trusted(ok, bundle, T0)
    assert not chain_still_trusted(ok, TrustBundle("cluster.local", ()), T0)


async def test_trust_bundle_change_that_drops_the_root_forces_renewal(
    env: Env,
    tmp_path: Path,
) -> None:
    bundle = {"b": env.ca.trust_bundle()}
    m = CertManager(env.signer, lambda: bundle["b"], clock=env.clock)
    store = StateStore(NODE)
    store.subscribe(m.on_state_change)
    try:
        store.apply(WatchUpdate("e", 1, True, (wl("a", "alpha"),), (), bundle["b"]))
        first = await m.fetch(ident("alpha"), timeout=5)
        # The CA rotates; a bundle holding only the new root invalidates the held cert.
        env.ca.rotate()
        new_root_only = TrustBundle("cluster.local", (env.ca.trust_bundle().roots[0],))
        if chain_still_trusted(first, new_root_only, env.clock.now()):
            new_root_only = TrustBundle("cluster.local", (env.ca.trust_bundle().roots[-1],))
        assert not chain_still_trusted(first, new_root_only, env.clock.now())
        bundle["b"] = new_root_only
        store.apply(WatchUpdate("e", 2, False, (), (), new_root_only))
        await env.clock.advance(1)
        second = m.get(ident("alpha"))
        assert second is not None and second.serial != first.serial
        assert chain_still_trusted(second, new_root_only, env.clock.now())
    finally:
        await m.close()


async def test_key_files_are_private_and_removed(env: Env, tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    m = env.manager(key_dir=key_dir)
    try:
        await m.fetch(ident("alpha"), timeout=5)
        key_file = key_dir / "cluster.local~ns~default~sa~alpha.key"
        crt_file = key_dir / "cluster.local~ns~default~sa~alpha.crt"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
        assert key_file.read_bytes() == m.get(ident("alpha")).key_pem  # type: ignore[union-attr]
        assert crt_file.exists()
        m.sync([])
        assert not key_file.exists() and not crt_file.exists()
        assert sorted(p.name for p in key_dir.iterdir()) == []
    finally:
        await m.close()


async def test_refresh_renews_now(env: Env, manager: CertManager) -> None:
    first = await manager.fetch(ident("alpha"), timeout=5)
    manager.refresh(ident("alpha"))
    await settle()
    second = manager.get(ident("alpha"))
    assert second is not None and second.serial != first.serial


async def test_closed_manager_refuses(env: Env) -> None:
    m = env.manager()
    await m.close()
    with pytest.raises(CertificateError, match="shut down"):
        await m.fetch(ident("alpha"), timeout=1)


def test_rotation_due_ignores_backdated_not_before() -> None:
    c = WorkloadCertificate(
        ident("a"), b"", (), T0 - timedelta(minutes=1), T0 + timedelta(seconds=4), 1, received_at=T0
    )
    assert c.rotation_due == T0 + timedelta(seconds=2)
    d = WorkloadCertificate(ident("a"), b"", (), T0, T0 + timedelta(hours=2), 1)
    assert d.rotation_due == T0 + timedelta(hours=1)


class FlakySigner(NodeSigner):
    """The real IdentityService behind a switch: while ``down`` every call fails
    the way controller.api.client reports an unreachable controller."""

    down = False

    async def create_certificate(
        self, csr_pem: bytes, identity: str, ttl_seconds: int = 0, timeout: float = 10.0
    ) -> tuple[bytes, ...]:
        if self.down:
            self.calls += 1
            from controller.api.errors import ApiError

            raise ApiError("UNAVAILABLE", "certificate refused: controller unreachable")
        return await super().create_certificate(csr_pem, identity, ttl_seconds, timeout)


async def test_reconnect_requests_every_expired_certificate_at_once(env: Env) -> None:
    signer = FlakySigner(env.identity, NODE)
    m = CertManager(
        signer,
        env.ca.trust_bundle,
        clock=env.clock,  # type: ignore[arg-type]
        retry_initial=1.0,
        retry_max=60.0,
    )
    try:
        await m.fetch(ident("alpha"), timeout=5)
        await m.fetch(ident("beta"), timeout=5)
        signer.down = True
        # A 2 h outage: both 1 h certificates lapse; retries back off to 60 s.
        await env.clock.advance(2 * 3600)
        assert m.get(ident("alpha")) is None and m.get(ident("beta")) is None
        pending = [s.next_attempt_at for s in m.statuses()]
        assert all(t is not None and t > env.clock.now() for t in pending)
        signer.down = False
        m.on_reconnect()
        await settle()  # no virtual time passes: not a single timer fires
        assert m.get(ident("alpha")) is not None and m.get(ident("beta")) is not None
        assert all(s.failures == 0 and s.state == "valid" for s in m.statuses())
    finally:
        await m.close()


async def test_reconnect_leaves_valid_certificates_alone(env: Env, manager: CertManager) -> None:
    first = await manager.fetch(ident("alpha"), timeout=5)
    calls = env.signer.calls
    manager.on_reconnect()
    await settle()
    assert env.signer.calls == calls and manager.get(ident("alpha")) is first
