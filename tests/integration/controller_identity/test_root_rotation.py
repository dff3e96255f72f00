"""Root rotation across processes, end to end: `veil controller ca rotate` while the
controller serves; both generations verify during the overlap; the old root is pruned
after its last certificate expires (injectable clock), and then nothing it signed is
accepted any more."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from controller.api.errors import ApiError
from controller.api.spiffe import SpiffeId
from node import join, refresh_trust_bundle, request_certificate

CART = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
PAYMENTS = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/payments")


def openssl_verify(bundle: Path, leaf_pem: bytes, tmp: Path) -> bool:
    leaf = tmp / "leaf.pem"
    leaf.write_bytes(leaf_pem)
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", str(bundle), str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return res.returncode == 0


async def _until(pred: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_rotation_overlap_and_pruning(controller: Any, veil_cli: Any, tmp_path: Path) -> None:
    state = controller.state_dir
    bundle_file = state / "ca" / "bundle.pem"
    n1 = await join(
        controller.join_address,
        controller.tokens.create("node-1"),
        "node-1",
        tmp_path / "n1",
        mtls_address=controller.mtls_address,
    )
    _, old_leaf = await request_certificate(n1, CART)
    old_fp = controller.ca.fingerprint

    watcher = asyncio.create_task(controller.ca.watch_state_dir(interval=0.05))
    try:
        res = await asyncio.to_thread(
            veil_cli, ["controller", "ca", "rotate", "--state-dir", str(state)]
        )
        assert res.returncode == 0, res.stderr
        new_fp = res.stdout.strip()
        assert new_fp != old_fp and "stays in the trust bundle until" in res.stderr
        await _until(lambda: controller.ca.fingerprint == new_fp)
        assert len(controller.ca.trust_bundle().roots) == 2

        # node-1 learns the new root from the Discovery stream, over its old (root 1) cert.
        n1 = await refresh_trust_bundle(tmp_path / "n1")
        assert len(n1.trust_bundle_pem) == 2
        _, new_leaf = await request_certificate(n1, CART)
        issuer = x509.load_pem_x509_certificate(new_leaf[0]).issuer
        assert issuer != x509.load_pem_x509_certificate(old_leaf[0]).issuer
        # Overlap: both generations verify against the published bundle.
        assert openssl_verify(bundle_file, old_leaf[0], tmp_path)
        assert openssl_verify(bundle_file, new_leaf[0], tmp_path)

        # A node joining now pins the new root and receives both.
        n2 = await join(
            controller.join_address,
            controller.tokens.create("node-2"),
            "node-2",
            tmp_path / "n2",
            mtls_address=controller.mtls_address,
        )
        assert len(n2.trust_bundle_pem) == 2
        await request_certificate(n2, PAYMENTS)

        shown = await asyncio.to_thread(
            veil_cli, ["controller", "ca", "show", "--state-dir", str(state), "-o", "json"]
        )
        roots = json.loads(shown.stdout)["roots"]
        assert [(r["fingerprint"], r["state"]) for r in roots] == [
            (new_fp, "active"),
            (old_fp, "retiring"),
        ]
        retire_after = controller.ca.authorities()[1].retire_after
        assert retire_after is not None
        assert retire_after >= x509.load_pem_x509_certificate(old_leaf[0]).not_valid_after_utc

        # Time passes beyond the last certificate root 1 signed: it is pruned.
        controller.clock.set(retire_after + timedelta(seconds=1))
        await _until(lambda: len(controller.ca.trust_bundle().roots) == 1)
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher

    shown = await asyncio.to_thread(
        veil_cli, ["controller", "ca", "show", "--state-dir", str(state), "-o", "json"]
    )
    assert [r["fingerprint"] for r in json.loads(shown.stdout)["roots"]] == [new_fp]
    assert not openssl_verify(bundle_file, old_leaf[0], tmp_path)
    assert openssl_verify(bundle_file, new_leaf[0], tmp_path)
    # Fail closed: node-1's certificate from the pruned root no longer opens the mTLS listener.
    with pytest.raises(ApiError) as e:
        await request_certificate(n1, CART, timeout=5)
    assert e.value.code == "UNAVAILABLE"
