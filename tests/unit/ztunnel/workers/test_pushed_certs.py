"""A worker's certificates: served from pushes, one request per missing identity."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from controller.api.spiffe import SpiffeId, workload_identity
from ztunnel.errors import CertificateError
from ztunnel.identity import WorkloadCertificate
from ztunnel.workers.certs import PushedCertificates

IDENT = workload_identity("cluster.local", "shop", "checkout")


def cert(expires_in: timedelta = timedelta(hours=1), serial: int = 1) -> WorkloadCertificate:
    now = datetime.now(UTC)
    return WorkloadCertificate(
        IDENT, b"key", (b"leaf",), now - timedelta(minutes=1), now + expires_in, serial
    )


async def test_fetch_asks_once_and_waits_for_the_push() -> None:
    asked: list[SpiffeId] = []
    certs = PushedCertificates(asked.append)
    waiting = [asyncio.create_task(certs.fetch(IDENT, timeout=5)) for _ in range(3)]
    await asyncio.sleep(0)
    assert asked == [IDENT]
    c = cert()
    certs.install(c)
    assert [await w for w in waiting] == [c, c, c]
    assert certs.get(IDENT) == c


async def test_refusal_and_timeout_are_certificate_errors() -> None:
    certs = PushedCertificates(lambda _i: None)
    task = asyncio.create_task(certs.fetch(IDENT, timeout=5))
    await asyncio.sleep(0)
    certs.refused(IDENT, "node not allowed")
    with pytest.raises(CertificateError, match="node not allowed"):
        await task
    with pytest.raises(CertificateError, match=r"after 0\.01s"):
        await certs.fetch(IDENT, timeout=0.01)


async def test_expired_and_dropped_certificates_are_not_served() -> None:
    certs = PushedCertificates(lambda _i: None)
    certs.install(cert(expires_in=timedelta(seconds=-1)))
    assert certs.get(IDENT) is None
    certs.install(cert(serial=2))
    assert certs.get(IDENT) is not None
    certs.drop(IDENT)
    assert certs.get(IDENT) is None
