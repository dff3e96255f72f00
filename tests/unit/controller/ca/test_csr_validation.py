"""CSR validation: every refusal is INVALID_ARGUMENT with a message naming the problem."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from controller.api.errors import ApiError
from controller.api.spiffe import SpiffeId
from controller.ca.csr import validate_csr

WANT = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")


def _csr(key: object, names: list[x509.GeneralName] | None) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _uri(u: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(u)


def _tamper(pem: bytes) -> bytes:
    """Flips one bit inside the signed part of the CSR (the SAN), keeping it parseable."""
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    i = der.find(b"cart")
    der[i] ^= 0x01  # 'c' -> 'b': still a valid URI, but the signature no longer matches
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def test_a_good_csr_returns_its_key() -> None:
    key = _p256()
    got = validate_csr(_csr(key, [_uri(str(WANT))]), WANT)
    assert got.public_numbers() == key.public_key().public_numbers()


CASES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "no CSR"),
    (
        "garbage",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "PKCS#10",
    ),
    ("not pem", b"hello", "PKCS#10"),
    ("too big", b"x" * 20000, "limit"),
    ("bad signature", _tamper(_csr(_p256(), [_uri(str(WANT))])), "signature"),
    ("rsa", _csr(rsa.generate_private_key(65537, 2048), [_uri(str(WANT))]), "P-256"),
    ("p384", _csr(ec.generate_private_key(ec.SECP384R1()), [_uri(str(WANT))]), "P-256"),
    ("ed25519", _csr(ed25519.Ed25519PrivateKey.generate(), [_uri(str(WANT))]), "P-256"),
    ("no san", _csr(_p256(), None), "no subjectAltName"),
    (
        "two uris",
        _csr(_p256(), [_uri(str(WANT)), _uri("spiffe://cluster.local/ns/shop/sa/x")]),
        "2 subjectAltNames",
    ),
    (
        "uri plus dns",
        _csr(_p256(), [_uri(str(WANT)), x509.DNSName("cart.shop")]),
        "2 subjectAltNames",
    ),
    ("dns only", _csr(_p256(), [x509.DNSName("cart.shop")]), "DNSName"),
    ("ip only", _csr(_p256(), [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]), "IPAddress"),
    ("other identity", _csr(_p256(), [_uri("spiffe://cluster.local/ns/shop/sa/admin")]), "differs"),
    ("other trust domain", _csr(_p256(), [_uri("spiffe://evil.org/ns/shop/sa/cart")]), "differs"),
    (
        "invalid spiffe",
        _csr(_p256(), [_uri("spiffe://cluster.local/ns/../sa/cart")]),
        "not a valid SPIFFE ID",
    ),
    (
        "http uri",
        _csr(_p256(), [_uri("https://cluster.local/ns/shop/sa/cart")]),
        "not a valid SPIFFE ID",
    ),
    ("case differs", _csr(_p256(), [_uri("spiffe://cluster.local/ns/shop/sa/Cart")]), "differs"),
]


@pytest.mark.parametrize(("name", "pem", "needle"), CASES, ids=[c[0] for c in CASES])
def test_refusals(name: str, pem: bytes, needle: str) -> None:
    with pytest.raises(ApiError) as e:
        validate_csr(pem, WANT)
    assert e.value.code == "INVALID_ARGUMENT"
    assert needle in e.value.message, (name, e.value.message)


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with pytest.raises(ApiError) as e:
        validate_csr(data, WANT)
    assert e.value.code == "INVALID_ARGUMENT"


_GOOD = _csr(_p256(), [_uri(str(WANT))])


@given(st.integers(min_value=0, max_value=len(_GOOD) - 1), st.integers(min_value=1, max_value=255))
def test_any_corruption_of_a_good_csr_is_refused_or_equivalent(pos: int, flip: int) -> None:
    data = bytearray(_GOOD)
    data[pos] ^= flip
    try:
        validate_csr(bytes(data), WANT)
    except ApiError as e:
        assert e.code == "INVALID_ARGUMENT"
        return
    # Only changes that do not alter the signed DER (e.g. PEM header noise) may pass.
    assert x509.load_pem_x509_csr(bytes(data)).public_bytes(serialization.Encoding.DER) == (
        x509.load_pem_x509_csr(_GOOD).public_bytes(serialization.Encoding.DER)
    )
