"""Issuance: SPIFFE X.509-SVID rules on every leaf, generated and user-supplied CAs."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.api.errors import ApiError
from controller.api.spiffe import SpiffeId
from controller.ca import CertificateAuthority
from controller.errors import CaError

TD = "cluster.local"
SID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def assert_svid(cert: x509.Certificate, identity: str) -> None:
    """Every MUST of the X.509-SVID spec for a leaf, checked extension by extension."""
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(identity)]
    assert san.critical  # empty subject => SAN must be critical (RFC 5280 4.2.1.6)
    assert len(cert.subject) == 0
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    ext.get_extension_for_class(x509.AuthorityKeyIdentifier)
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)


def test_issued_svid_follows_every_rule(ca: CertificateAuthority, csr_factory: Any) -> None:
    key, csr = csr_factory(str(SID))
    chain = ca.sign_csr(csr, SID, timedelta(hours=2))
    assert len(chain) == 1  # generated root signs directly; the root is never in a leaf chain
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert_svid(leaf, str(SID))
    root = x509.load_pem_x509_certificate(ca.trust_bundle().roots[0])
    leaf.verify_directly_issued_by(root)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(hours=2) <= lifetime <= timedelta(hours=2, minutes=2)
    # An independent implementation agrees.
    svid = spiffe.X509Svid.parse(chain[0], _key_pem(key))
    assert str(svid.spiffe_id) == str(SID)


def test_generated_root_is_a_p256_ca_with_a_private_key_file(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    root = x509.load_pem_x509_certificate(ca.trust_bundle().roots[0])
    assert root.issuer == root.subject
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign
    pub = root.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    state = tmp_path / "ctl" / "ca" / "ca.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ctl" / "ca").stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in state.read_bytes()
    assert b"PRIVATE KEY" not in (tmp_path / "ctl" / "ca" / "bundle.pem").read_bytes()
    assert len(ca.fingerprint) == 64


def test_load_or_create_is_idempotent(tmp_path: Path, ca: CertificateAuthority) -> None:
    again = CertificateAuthority.load_or_create(tmp_path / "ctl", TD)
    assert again.fingerprint == ca.fingerprint
    assert again.trust_bundle() == ca.trust_bundle()


def test_trust_domain_mismatch_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    with pytest.raises(CaError, match=r"belongs to trust domain 'cluster\.local'"):
        CertificateAuthority.load_or_create(tmp_path / "ctl", "example.org")


def test_load_without_ca_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(CaError) as e:
        CertificateAuthority.load(tmp_path / "empty")
    assert e.value.hint and "ca init" in e.value.hint


def test_identity_outside_the_trust_domain_is_refused(
    ca: CertificateAuthority, csr_factory: Any
) -> None:
    other = SpiffeId.parse("spiffe://example.org/ns/shop/sa/cart")
    _, csr = csr_factory(str(other))
    with pytest.raises(ApiError) as e:
        ca.sign_csr(csr, other, timedelta(hours=1))
    assert e.value.code == "INVALID_ARGUMENT" and "trust domain" in e.value.message


def test_serving_certificate_chain_includes_the_root(ca: CertificateAuthority) -> None:
    key_pem, chain_pem = ca.issue_serving_certificate(
        ["veil-controller"], ["127.0.0.1"], timedelta(hours=1)
    )
    certs = x509.load_pem_x509_certificates(chain_pem)
    assert certs[-1].public_bytes(serialization.Encoding.PEM) == ca.trust_bundle().roots[0]
    leaf = certs[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["veil-controller"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/veil/controller"
    ]
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key() == leaf.public_key()


# ----- user-supplied CA ----------------------------------------------------------


def _ca_cert(
    subject: str,
    key: Any,
    issuer: x509.Certificate | None,
    issuer_key: Any,
    *,
    not_after: datetime,
    path_length: int | None = None,
    ca: bool = True,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    return b.sign(issuer_key or key, hashes.SHA256())


def write_user_ca(
    d: Path, *, root_days: int = 3650, inter_hours: float = 24 * 365, root_key: Any = None
) -> dict[str, Path]:
    """Root (RSA by default, to prove CA keys need not be P-256) -> intermediate (P-256)."""
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    rkey = root_key or rsa.generate_private_key(65537, 2048)
    root = _ca_cert("Test Root", rkey, None, None, not_after=now + timedelta(days=root_days))
    ikey = ec.generate_private_key(ec.SECP256R1())
    inter = _ca_cert(
        "Test Intermediate",
        ikey,
        root,
        rkey,
        not_after=now + timedelta(hours=inter_hours),
        path_length=0,
    )
    paths = {
        "cert": d / "inter.pem",
        "key": d / "inter-key.pem",
        "chain": d / "root.pem",
        "root_key": d / "root-key.pem",
    }
    paths["cert"].write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_key_pem(ikey))
    paths["chain"].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    paths["root_key"].write_bytes(_key_pem(rkey))
    return paths


def test_user_ca_with_intermediate(tmp_path: Path, csr_factory: Any) -> None:
    p = write_user_ca(tmp_path / "userca")
    ca = CertificateAuthority.load_or_create(
        tmp_path / "ctl", TD, ca_cert=p["cert"], ca_key=p["key"], ca_chain=p["chain"]
    )
    assert ca.trust_bundle().roots == (p["chain"].read_bytes(),)
    key, csr = csr_factory(str(SID))
    chain = ca.sign_csr(csr, SID, timedelta(hours=1))
    assert len(chain) == 2 and chain[1] == p["cert"].read_bytes()
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert_svid(leaf, str(SID))
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(chain[1]))
    svid = spiffe.X509Svid.parse(b"".join(chain), _key_pem(key))
    assert [c.subject for c in svid.cert_chain] == [
        leaf.subject,
        x509.load_pem_x509_certificate(chain[1]).subject,
    ]
    info = ca.authorities()[0]
    assert info.source == "imported" and info.intermediates == 1 and info.subject == "CN=Test Root"
    # Restarting without the flags keeps using the imported CA.
    assert CertificateAuthority.load_or_create(tmp_path / "ctl", TD).fingerprint == ca.fingerprint


def test_leaf_lifetime_is_clamped_to_the_ca_expiry(tmp_path: Path, csr_factory: Any) -> None:
    p = write_user_ca(tmp_path / "userca", inter_hours=1)
    ca = CertificateAuthority.load_or_create(
        tmp_path / "ctl", TD, ca_cert=p["cert"], ca_key=p["key"], ca_chain=p["chain"]
    )
    _, csr = csr_factory(str(SID))
    leaf = x509.load_pem_x509_certificate(ca.sign_csr(csr, SID, timedelta(hours=24))[0])
    inter = x509.load_pem_x509_certificate(p["cert"].read_bytes())
    assert leaf.not_valid_after_utc == inter.not_valid_after_utc


def _bad_ca(tmp_path: Path, kind: str) -> tuple[Path, Path, Path | None]:
    p = write_user_ca(tmp_path / "userca")
    now = datetime.now(UTC)
    if kind == "key mismatch":
        other = ec.generate_private_key(ec.SECP256R1())
        p["key"].write_bytes(_key_pem(other))
        return p["cert"], p["key"], p["chain"]
    if kind == "no root":
        return p["cert"], p["key"], None
    if kind == "not a CA":
        k = ec.generate_private_key(ec.SECP256R1())
        leaf = _ca_cert("leaf", k, None, None, not_after=now + timedelta(days=1), ca=False)
        p["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        p["key"].write_bytes(_key_pem(k))
        return p["cert"], p["key"], None
    if kind == "expired":
        k = ec.generate_private_key(ec.SECP256R1())
        old = _ca_cert("old", k, None, None, not_after=now - timedelta(hours=1))
        p["cert"].write_bytes(old.public_bytes(serialization.Encoding.PEM))
        p["key"].write_bytes(_key_pem(k))
        return p["cert"], p["key"], None
    if kind == "wrong order":
        other_ca = write_user_ca(tmp_path / "other")
        return p["cert"], p["key"], other_ca["chain"]
    if kind == "missing file":
        return tmp_path / "nope.pem", p["key"], None
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("key mismatch", "does not belong"),
        ("no root", "not a self-signed root"),
        ("not a CA", "is not a CA"),
        ("expired", "expired"),
        ("wrong order", "is not signed by the next"),
        ("missing file", "cannot read"),
    ],
)
def test_bad_user_ca_is_refused_with_a_reason(tmp_path: Path, kind: str, needle: str) -> None:
    cert, key, chain = _bad_ca(tmp_path, kind)
    with pytest.raises(CaError) as e:
        CertificateAuthority.load_or_create(
            tmp_path / "ctl", TD, ca_cert=cert, ca_key=key, ca_chain=chain
        )
    assert needle in e.value.message
    assert not (tmp_path / "ctl" / "ca" / "ca.json").exists()


def test_ca_cert_without_key_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(CaError, match="both --ca-cert and --ca-key"):
        CertificateAuthority.load_or_create(tmp_path / "ctl", TD, ca_cert=tmp_path / "x.pem")
