"""Pure X.509 building blocks: self-signed roots, SVID and serving leaves, fingerprints.

Nothing here touches disk or keeps state. The extension sets are the SPIFFE
X.509-SVID rules, written down once:

* leaf: ``basicConstraints`` critical with ``cA=false``; ``keyUsage`` critical with
  ``digitalSignature`` only (never ``keyCertSign``/``cRLSign``; EC keys need no
  ``keyEncipherment``); ``extendedKeyUsage`` serverAuth + clientAuth; exactly one
  URI SAN; subject and authority key identifiers.
* SVIDs have an empty subject, so RFC 5280 (4.2.1.6) makes their SAN critical.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.api.spiffe import SpiffeId

__all__ = [
    "CLOCK_SKEW",
    "ROOT_VALIDITY",
    "SigningKey",
    "build_leaf",
    "build_self_signed_root",
    "certificate_pem",
    "fingerprint",
    "generate_p256_key",
    "hash_for",
    "private_key_pem",
    "serving_sans",
    "spiffe_san",
    "subject_key_id",
    "uri_sans",
]

# Leaves start a little in the past so a node whose clock lags the controller's
# still accepts a certificate issued a second ago.
CLOCK_SKEW = timedelta(minutes=1)
ROOT_VALIDITY = timedelta(days=3650)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_LEAF_BASIC = x509.BasicConstraints(ca=False, path_length=None)


def generate_p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the DER encoding: the CA fingerprint in join tokens."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    """The signature hash matching the key's strength (P-384 gets SHA-384, and so on)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 384:
            return hashes.SHA512()
        if key.curve.key_size > 256:
            return hashes.SHA384()
    return hashes.SHA256()


def subject_key_id(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    """The certificate's SKI extension, or one computed from its key (RFC 5280 method 1)."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def build_self_signed_root(
    key: SigningKey, trust_domain: str, now: datetime, label: str
) -> x509.Certificate:
    """A root for ``trust_domain``: CA, path length 0 (it signs leaves directly).

    The URI SAN ``spiffe://<td>`` follows the SPIFFE recommendation for signing
    certificates; ``label`` tells rotated roots apart in ``veil controller ca show``.
    """
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Veil"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Veil root CA {label}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    return builder.sign(key, hash_for(key))


def serving_sans(dns_names: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)
    return names


def build_leaf(
    *,
    public_key: ec.EllipticCurvePublicKey,
    sans: Sequence[x509.GeneralName],
    issuer: x509.Certificate,
    issuer_key: SigningKey,
    issuer_ski: x509.SubjectKeyIdentifier,
    not_before: datetime,
    not_after: datetime,
    subject: x509.Name | None = None,
) -> x509.Certificate:
    """Signs a leaf with the SVID extension set (also used for serving certificates).

    With no ``subject`` the subject is empty and the SAN is critical, as RFC 5280
    requires; that is the SVID form. Serving certificates pass a CN.
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_LEAF_BASIC, critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(_LEAF_EKU, critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=subject is None)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    )
    return builder.sign(issuer_key, hash_for(issuer_key))


def spiffe_san(identity: SpiffeId) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(str(identity))]
