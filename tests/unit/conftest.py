"""Fixtures for the controller identity unit tests (CA, tokens, authorization, node side)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.ca import CertificateAuthority

TD = "cluster.local"


class MutableClock:
    """An injectable clock the test moves by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


CsrFactory = Callable[..., tuple[ec.EllipticCurvePrivateKey, bytes]]


def make_csr(
    sans: str | Sequence[x509.GeneralName] | None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A PEM CSR; ``sans`` is one URI string, a list of names, or None for no SAN."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if isinstance(sans, str):
        sans = [x509.UniformResourceIdentifier(sans)]
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    csr = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return key, csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def clock() -> MutableClock:
    return MutableClock()


@pytest.fixture
def ca(tmp_path: Path, clock: MutableClock) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ctl", TD, clock=clock)


@pytest.fixture
def csr_factory() -> CsrFactory:
    return make_csr
