"""CA material: importing a user-supplied CA, and the in-memory signer built from a record.

A user-supplied CA is the signing certificate and its key, plus optionally the
certificates above it up to a self-signed root. It is checked before use: the
key matches the certificate, the signer is a CA allowed to sign certificates,
each certificate is signed by the next, path length constraints allow one more
level, nothing is expired, and the chain ends in a self-signed root (the trust
anchor nodes pin). Leaves issued under it carry the chain ``leaf, intermediates...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controller.errors import CaError

from .certs import SigningKey, certificate_pem, fingerprint, subject_key_id
from .store import AuthorityRecord

__all__ = ["Signer", "import_authority", "signer_from_record"]


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CaError(
            f"cannot read the {what} {path}: {e.strerror}",
            hint=f"check the path given for the {what}",
        ) from None


def _load_certs(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CaError(f"{where} holds no readable PEM certificate: {e}") from None
    return certs


def _load_key(data: bytes, where: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CaError(
            f"{where} is not an unencrypted PEM private key: {e}",
            hint="decrypt it first, e.g. `openssl pkey -in key.pem -out plain.pem`",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(
            f"{where} holds a {type(key).__name__} key; the CA key must be ECDSA or RSA",
            hint="ECDSA P-256 is recommended",
        )
    return key


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_ca(cert: x509.Certificate, where: str, below: int) -> None:
    """``below``: how many CA certificates sit between this one and the leaves."""
    subject = cert.subject.rfc4514_string()
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CaError(
            f"{where}: certificate {subject!r} is not a CA (basicConstraints cA is not true)",
            hint="supply a CA certificate, not a leaf",
        )
    if bc.path_length is not None and below > bc.path_length:
        raise CaError(
            f"{where}: certificate {subject!r} has pathLenConstraint {bc.path_length} but "
            f"{below} CA certificate(s) sit below it",
            hint="use a CA whose path length allows this chain",
        )
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not ku.key_cert_sign:
        raise CaError(f"{where}: certificate {subject!r} has keyUsage without keyCertSign")


def import_authority(
    cert_path: Path, key_path: Path, chain_path: Path | None, now: datetime
) -> AuthorityRecord:
    """Reads and checks a user-supplied CA; returns a record ready to store."""
    certs = _load_certs(_read(cert_path, "CA certificate"), str(cert_path))
    if chain_path is not None:
        certs += _load_certs(_read(chain_path, "CA chain"), str(chain_path))
    key_pem = _read(key_path, "CA key")
    key = _load_key(key_pem, str(key_path))
    signer = certs[0]
    if signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CaError(
            f"the CA key {key_path} does not belong to the certificate {cert_path}",
            hint="pass the key that matches the first certificate in the CA certificate file",
        )
    for i, cert in enumerate(certs):
        where = str(cert_path if i == 0 else chain_path or cert_path)
        _check_ca(cert, where, below=i)
        if cert.not_valid_after_utc <= now:
            raise CaError(
                f"{where}: certificate {cert.subject.rfc4514_string()!r} expired at "
                f"{cert.not_valid_after_utc.isoformat()}",
                hint="renew the CA before importing it",
            )
        if i + 1 < len(certs):
            try:
                cert.verify_directly_issued_by(certs[i + 1])
            except (ValueError, TypeError, InvalidSignature):
                raise CaError(
                    f"{where}: certificate {cert.subject.rfc4514_string()!r} is not signed by the "
                    f"next one in the chain ({certs[i + 1].subject.rfc4514_string()!r})",
                    hint="order the chain from the signing CA up to the root",
                ) from None
    if not _is_self_signed(certs[-1]):
        raise CaError(
            f"the CA chain ends at {certs[-1].subject.rfc4514_string()!r}, which is not a "
            "self-signed root",
            hint="append the root certificate to --ca-chain; nodes pin the root",
        )
    # Normalise the key to PKCS#8 so every stored key has one format.
    key_pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return AuthorityRecord(
        key_pem=key_pkcs8,
        cert_pem=certificate_pem(signer),
        chain_pem=tuple(certificate_pem(c) for c in certs[1:]),
        source="imported",
        created=now,
    )


@dataclass(frozen=True, slots=True)
class Signer:
    """A parsed authority, ready to sign: everything costly is computed once."""

    record: AuthorityRecord
    key: SigningKey
    cert: x509.Certificate
    ski: x509.SubjectKeyIdentifier
    root: x509.Certificate
    root_fingerprint: str
    intermediates_pem: tuple[bytes, ...]  # what follows a leaf in its chain (no root)
    not_after_limit: datetime  # a leaf cannot outlive any certificate above it

    @property
    def root_pem(self) -> bytes:
        return self.record.root_pem


def signer_from_record(record: AuthorityRecord) -> Signer:
    try:
        key = _load_key(record.key_pem, "stored CA key")
        certs = [x509.load_pem_x509_certificate(record.cert_pem)]
        certs += [x509.load_pem_x509_certificate(c) for c in record.chain_pem]
    except ValueError as e:
        raise CaError(
            f"stored CA material is unreadable: {e}",
            hint="restore the state directory from backup",
        ) from None
    chain = certs[:-1] if len(certs) > 1 else []
    return Signer(
        record=record,
        key=key,
        cert=certs[0],
        ski=subject_key_id(certs[0]),
        root=certs[-1],
        root_fingerprint=fingerprint(certs[-1]),
        intermediates_pem=tuple(certificate_pem(c) for c in chain),
        not_after_limit=min(c.not_valid_after_utc for c in certs),
    )
