"""Root rotation: several roots in the bundle, tracking of issued lifetimes, pruning."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from controller.ca import CertificateAuthority, FileCaStore

TD = "cluster.local"
SID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")


def _issue(ca: CertificateAuthority, csr_factory: Any, ttl: timedelta) -> x509.Certificate:
    _, csr = csr_factory(str(SID))
    return x509.load_pem_x509_certificate(ca.sign_csr(csr, SID, ttl)[0])


def _issuer_root(leaf: x509.Certificate, bundle: TrustBundle) -> int | None:
    """Index of the bundle root that signed ``leaf``, or None."""
    for i, pem in enumerate(bundle.roots):
        try:
            leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(pem))
        except Exception:
            continue
        return i
    return None


def test_rotation_keeps_the_old_root_until_its_last_certificate_expires(
    ca: CertificateAuthority, csr_factory: Any, clock: Any
) -> None:
    seen: list[TrustBundle] = []
    ca.add_listener(seen.append)
    old_fp = ca.fingerprint
    old_leaf = _issue(ca, csr_factory, timedelta(hours=2))

    new = ca.rotate()
    assert new.state == "active" and new.fingerprint != old_fp == ca.authorities()[1].fingerprint
    bundle = ca.trust_bundle()
    assert len(bundle.roots) == 2 and seen == [bundle]
    new_leaf = _issue(ca, csr_factory, timedelta(hours=1))
    # Both generations verify against the bundle during the overlap.
    assert _issuer_root(new_leaf, bundle) == 0
    assert _issuer_root(old_leaf, bundle) == 1

    retiring = ca.authorities()[1]
    assert retiring.state == "retiring"
    assert retiring.retire_after is not None
    assert retiring.retire_after >= old_leaf.not_valid_after_utc
    # Not yet: the old leaf is still valid.
    clock.advance(timedelta(hours=1))
    assert ca.prune() is False and len(ca.trust_bundle().roots) == 2
    # After its last certificate (plus the bookkeeping slack) the old root goes.
    clock.now = retiring.retire_after + timedelta(seconds=1)
    assert ca.prune() is True
    assert len(ca.trust_bundle().roots) == 1 and len(seen) == 2
    assert _issuer_root(old_leaf, ca.trust_bundle()) is None
    assert _issuer_root(new_leaf, ca.trust_bundle()) == 0


def test_a_root_that_signed_nothing_leaves_at_once(ca: CertificateAuthority) -> None:
    ca.rotate()
    assert len(ca.trust_bundle().roots) == 1


def test_issued_lifetimes_are_persisted_before_use_but_not_on_every_certificate(
    tmp_path: Path, ca: CertificateAuthority, csr_factory: Any
) -> None:
    leaf = _issue(ca, csr_factory, timedelta(hours=2))
    store = FileCaStore(tmp_path / "ctl")
    state = store.load()
    assert state is not None and state.active.issued_until is not None
    assert state.active.issued_until >= leaf.not_valid_after_utc
    before = store.path.read_bytes()
    for _ in range(5):
        _issue(ca, csr_factory, timedelta(hours=2))
    assert store.path.read_bytes() == before  # within the slack: no write per certificate
    # A reopened CA (e.g. after a crash) still knows the bound.
    reopened = CertificateAuthority.load(tmp_path / "ctl")
    reopened.rotate()
    assert reopened.authorities()[1].retire_after == state.active.issued_until


def test_a_rotation_by_another_process_is_picked_up(
    tmp_path: Path, ca: CertificateAuthority, csr_factory: Any
) -> None:
    seen: list[TrustBundle] = []
    ca.add_listener(seen.append)
    _issue(ca, csr_factory, timedelta(hours=1))
    cli = CertificateAuthority.load(tmp_path / "ctl")  # what `veil controller ca rotate` opens
    cli.rotate()
    assert ca.reload() is True
    assert ca.fingerprint == cli.fingerprint and len(seen) == 1
    leaf = _issue(ca, csr_factory, timedelta(hours=1))
    assert _issuer_root(leaf, ca.trust_bundle()) == 0


def test_signing_with_an_authority_another_process_removed_switches_to_the_new_one(
    tmp_path: Path, ca: CertificateAuthority, csr_factory: Any
) -> None:
    cli = CertificateAuthority.load(tmp_path / "ctl")
    cli.rotate()  # the old root signed nothing, so it is pruned immediately
    assert len(cli.trust_bundle().roots) == 1
    leaf = _issue(ca, csr_factory, timedelta(hours=1))  # ca still believes in the old root
    assert ca.fingerprint == cli.fingerprint
    assert _issuer_root(leaf, cli.trust_bundle()) == 0


def test_importing_a_new_user_ca_at_restart_retires_the_generated_root(
    tmp_path: Path, ca: CertificateAuthority, csr_factory: Any
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from controller.ca.authority import utc_now
    from controller.ca.certs import build_self_signed_root, private_key_pem

    _issue(ca, csr_factory, timedelta(hours=1))
    key = ec.generate_private_key(ec.SECP256R1())
    root = build_self_signed_root(key, TD, utc_now(), "user")
    (tmp_path / "u.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "u-key.pem").write_bytes(private_key_pem(key))
    restarted = CertificateAuthority.load_or_create(
        tmp_path / "ctl", TD, ca_cert=tmp_path / "u.pem", ca_key=tmp_path / "u-key.pem"
    )
    infos = restarted.authorities()
    assert [(i.state, i.source) for i in infos] == [
        ("active", "imported"),
        ("retiring", "generated"),
    ]
    assert infos[1].fingerprint == ca.fingerprint


async def test_watch_state_dir_notifies_listeners(
    tmp_path: Path, ca: CertificateAuthority, csr_factory: Any
) -> None:
    _issue(ca, csr_factory, timedelta(hours=1))
    changed = asyncio.Event()
    ca.add_listener(lambda _b: changed.set())
    task = asyncio.create_task(ca.watch_state_dir(interval=0.02))
    try:
        await asyncio.to_thread(lambda: CertificateAuthority.load(tmp_path / "ctl").rotate())
        await asyncio.wait_for(changed.wait(), 5)
        assert len(ca.trust_bundle().roots) == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
