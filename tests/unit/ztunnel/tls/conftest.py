"""A small in-memory test CA for the TLS unit tests (no sockets, no files)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.api.model import TrustBundle
from controller.api.spiffe import InvalidSpiffeId, SpiffeId
from ztunnel.identity.certificate import WorkloadCertificate


class TestCa:
    """Issues SVIDs, and the malformed certificates a real CA never would."""

    __test__ = False

    def __init__(self, trust_domain: str = "cluster.local") -> None:
        self.trust_domain = trust_domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test root")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, (self.cert.public_bytes(serialization.Encoding.PEM),))

    def issue(
        self,
        uris: Sequence[str],
        *,
        expired: bool = False,
        ca_leaf: bool = False,
    ) -> WorkloadCertificate:
        now = datetime.now(UTC)
        nb, na = (
            (now - timedelta(hours=3), now - timedelta(hours=1))
            if expired
            else (now - timedelta(minutes=5), now + timedelta(hours=1))
        )
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=ca_leaf, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, ca_leaf, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        try:
            identity = SpiffeId.parse(uris[0])
        except (IndexError, InvalidSpiffeId):
            identity = SpiffeId("cluster.local", "/none")  # the certificate is broken on purpose
        return WorkloadCertificate(
            identity=identity,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            chain_pem=(cert.public_bytes(serialization.Encoding.PEM),),
            not_before=nb,
            not_after=na,
            serial=cert.serial_number,
        )


@pytest.fixture(scope="module")
def test_ca() -> TestCa:
    return TestCa()


@pytest.fixture(scope="module")
def other_ca() -> TestCa:
    return TestCa()
