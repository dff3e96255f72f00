"""Certificates issued over the real gRPC API conform to the X.509-SVID rules,
cross-checked by the `spiffe` library and by `openssl verify`, for a generated
root and for a user-supplied CA (built with the openssl CLI) with an intermediate."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import spiffe
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller.api.spiffe import SpiffeId
from node import join, request_certificate

TD = "cluster.local"
CART = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")


def assert_svid(pem: bytes, identity: str) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(pem)
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(identity)]
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    ext.get_extension_for_class(x509.AuthorityKeyIdentifier)
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    return cert


def openssl_verify(tmp: Path, bundle: bytes, chain: tuple[bytes, ...], purpose: str) -> str:
    (tmp / "bundle.pem").write_bytes(bundle)
    (tmp / "leaf.pem").write_bytes(chain[0])
    argv = [
        "openssl",
        "verify",
        "-x509_strict",
        "-purpose",
        purpose,
        "-CAfile",
        str(tmp / "bundle.pem"),
    ]
    if len(chain) > 1:
        (tmp / "untrusted.pem").write_bytes(b"".join(chain[1:]))
        argv += ["-untrusted", str(tmp / "untrusted.pem")]
    res = subprocess.run(
        [*argv, str(tmp / "leaf.pem")], capture_output=True, text=True, timeout=30, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def cross_check(
    tmp: Path, key_pem: bytes, chain: tuple[bytes, ...], bundle: tuple[bytes, ...], identity: str
) -> None:
    assert_svid(chain[0], identity)
    svid = spiffe.X509Svid.parse(b"".join(chain), key_pem)
    assert str(svid.spiffe_id) == identity
    tb = spiffe.X509Bundle.parse(spiffe.TrustDomain(TD), b"".join(bundle))
    assert len(tb.x509_authorities) == len(bundle)
    for purpose in ("sslclient", "sslserver"):
        assert "OK" in openssl_verify(tmp, b"".join(bundle), chain, purpose)


async def test_generated_root(controller: Any, tmp_path: Path) -> None:
    token = controller.tokens.create("node-1")
    creds = await join(
        controller.join_address,
        token,
        "node-1",
        tmp_path / "node",
        mtls_address=controller.mtls_address,
    )
    assert creds.trust_bundle_pem == controller.ca.trust_bundle().roots
    # The node certificate is an SVID too (of the node identity).
    cross_check(
        tmp_path,
        creds.key_pem,
        creds.cert_chain_pem,
        creds.trust_bundle_pem,
        "spiffe://cluster.local/veil/node/node-1",
    )
    key, chain = await request_certificate(creds, CART)
    assert len(chain) == 1
    cross_check(tmp_path, key, chain, creds.trust_bundle_pem, str(CART))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_openssl_ca(d: Path) -> dict[str, Path]:
    """Root -> intermediate made by the openssl CLI, independently of Veil's code."""
    d.mkdir()
    (d / "ext.cnf").write_text(
        "[v3_inter]\nbasicConstraints=critical,CA:TRUE,pathlen:0\n"
        "keyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "root.key", cwd=d)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "root.key",
        "-subj",
        "/O=Test/CN=Test Root",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "root.pem",
        cwd=d,
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "inter.key", cwd=d)
    _openssl(
        "req",
        "-new",
        "-key",
        "inter.key",
        "-subj",
        "/O=Test/CN=Test Intermediate",
        "-out",
        "inter.csr",
        cwd=d,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "inter.csr",
        "-CA",
        "root.pem",
        "-CAkey",
        "root.key",
        "-set_serial",
        "2",
        "-days",
        "10",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "v3_inter",
        "-out",
        "inter.pem",
        cwd=d,
    )
    return {"cert": d / "inter.pem", "key": d / "inter.key", "chain": d / "root.pem"}


async def test_user_supplied_ca_with_intermediate(controller_factory: Any, tmp_path: Path) -> None:
    ca_files = make_openssl_ca(tmp_path / "userca")
    ctl = await controller_factory(
        tmp_path / "controller",
        ca_cert=ca_files["cert"],
        ca_key=ca_files["key"],
        ca_chain=ca_files["chain"],
    )
    root_pem = ca_files["chain"].read_bytes()
    assert ctl.ca.trust_bundle().roots == (root_pem,)
    creds = await join(
        ctl.join_address,
        ctl.tokens.create("node-1"),
        "node-1",
        tmp_path / "node",
        mtls_address=ctl.mtls_address,
    )
    # Leaf chains are leaf, intermediates...; the root comes from the bundle only.
    assert creds.cert_chain_pem[1:] == (ca_files["cert"].read_bytes(),)
    cross_check(
        tmp_path,
        creds.key_pem,
        creds.cert_chain_pem,
        creds.trust_bundle_pem,
        "spiffe://cluster.local/veil/node/node-1",
    )
    key, chain = await request_certificate(creds, CART)
    assert len(chain) == 2
    cross_check(tmp_path, key, chain, creds.trust_bundle_pem, str(CART))
