"""Node-side key and CSR handling (pure; no I/O).

The node generates its ECDSA P-256 keys itself and sends only a CSR naming the
one identity it wants. When the chain comes back it re-checks, rather than
trusting the controller: the leaf must carry exactly that URI SAN, certify the
key the node holds, be a non-CA leaf, and chain to the trust bundle. The
ztunnel's certificate manager uses the same functions for workload SVIDs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.api.spiffe import SpiffeId
from node.errors import NodeCredentialsError

__all__ = [
    "build_csr",
    "check_issued_chain",
    "generate_key",
    "key_pem",
    "load_key",
    "split_pem_chain",
]


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key; it never leaves this process except into a 0600 file."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(pem: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise NodeCredentialsError(f"{where} is not a readable private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeCredentialsError(f"{where} is not an ECDSA key")
    return key


def build_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """A PEM PKCS#10 CSR with an empty subject and the one URI SAN ``identity``."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def split_pem_chain(chain: Sequence[bytes]) -> list[x509.Certificate]:
    """Parses PEM blocks (one or several per element) into certificates, in order."""
    certs: list[x509.Certificate] = []
    for block in chain:
        try:
            certs.extend(x509.load_pem_x509_certificates(block))
        except ValueError as e:
            raise NodeCredentialsError(
                f"the controller sent an unreadable certificate: {e}"
            ) from None
    return certs


def _spki(key: ec.EllipticCurvePublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_issued_chain(
    chain: Sequence[bytes],
    expected: SpiffeId,
    key: ec.EllipticCurvePrivateKey,
    roots: Sequence[bytes],
    now: datetime | None = None,
) -> x509.Certificate:
    """Re-checks a chain the controller returned; returns the leaf.

    Raises NodeCredentialsError naming what is wrong; the node then refuses to
    use the certificate.
    """
    certs = split_pem_chain(chain)
    if not certs:
        raise NodeCredentialsError(f"the controller returned no certificate for {expected}")
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = list(san)
    except x509.ExtensionNotFound:
        names = []
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    if len(names) != 1 or uris != [str(expected)]:
        raise NodeCredentialsError(
            f"the controller returned a certificate for {uris or 'no URI SAN'} with "
            f"{len(names)} SAN(s); asked for exactly {expected}",
            hint="refusing it; check the controller version and its logs",
        )
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise NodeCredentialsError(
            f"the certificate returned for {expected} does not certify the key this node generated"
        )
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise NodeCredentialsError(
                f"the certificate returned for {expected} is a CA certificate"
            )
    except x509.ExtensionNotFound:
        pass
    now = now or datetime.now(UTC)
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        raise NodeCredentialsError(
            f"the certificate returned for {expected} is not valid now "
            f"({leaf.not_valid_before_utc.isoformat()} .. {leaf.not_valid_after_utc.isoformat()})",
            hint="check that this node's clock is synchronised",
        )
    _check_chains_to(certs, split_pem_chain(roots), expected)
    return leaf


def _check_chains_to(
    certs: list[x509.Certificate], roots: list[x509.Certificate], expected: SpiffeId
) -> None:
    """Each certificate is signed by the next, and the last by a root in the bundle."""
    for child, parent in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise NodeCredentialsError(
                f"the chain returned for {expected} is not in order or not signed by its issuers"
            ) from None
    top = certs[-1]
    for root in roots:
        try:
            top.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise NodeCredentialsError(
        f"the certificate returned for {expected} does not chain to any root in the trust bundle",
        hint="the CA may have rotated; refresh the trust bundle (re-join or watch the controller)",
    )
