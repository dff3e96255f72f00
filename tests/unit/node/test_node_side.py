"""Node side without sockets: address parsing, CA pinning, re-checking issued chains,
credential files, and CLI duration parsing."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from controller.api.spiffe import SpiffeId, node_identity
from controller.ca import CertificateAuthority
from controller.cli import format_duration, parse_duration
from node import (
    NodeCredentials,
    build_csr,
    check_issued_chain,
    generate_key,
    key_pem,
    load_node_credentials,
    save_node_credentials,
    select_pinned_root,
    split_host_port,
)
from node.errors import NodeCredentialsError
from node.pinning import trust_domain_hint

SID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.1", ("10.0.0.1", 15013)),
        ("10.0.0.1:9000", ("10.0.0.1", 9000)),
        ("ctl.example", ("ctl.example", 15013)),
        ("[::1]:15013", ("::1", 15013)),
        ("[fd00::1]", ("fd00::1", 15013)),
        ("::1", ("::1", 15013)),
    ],
)
def test_split_host_port(text: str, want: tuple[str, int]) -> None:
    assert split_host_port(text, 15013) == want


@pytest.mark.parametrize("text", ["", ":15013", "host:0", "host:99999", "host:http", "[::1]x"])
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(NodeCredentialsError):
        split_host_port(text, 15013)


def _ders(chain_pem: bytes) -> list[bytes]:
    return [
        c.public_bytes(serialization.Encoding.DER)
        for c in x509.load_pem_x509_certificates(chain_pem)
    ]


def test_pinning_selects_the_root_by_fingerprint(ca: CertificateAuthority) -> None:
    _, chain = ca.issue_serving_certificate(["veil-controller"], [], timedelta(hours=1))
    ders = _ders(chain)
    assert select_pinned_root(ders, ca.fingerprint) == ca.trust_bundle().roots[0]
    assert trust_domain_hint(ders) == "cluster.local"
    with pytest.raises(NodeCredentialsError, match="matches the CA fingerprint"):
        select_pinned_root(ders, "00" * 32)
    # The leaf's own fingerprint would also "match"; that is fine only because
    # gRPC then verifies the chain, but a wrong token never matches anything.
    assert hashlib.sha256(ders[0]).hexdigest() != ca.fingerprint


def _issue(ca: CertificateAuthority, identity: SpiffeId) -> tuple[Any, tuple[bytes, ...]]:
    key = generate_key()
    return key, ca.sign_csr(build_csr(key, identity), identity, timedelta(hours=1))


def test_check_issued_chain_accepts_the_real_thing(ca: CertificateAuthority) -> None:
    key, chain = _issue(ca, SID)
    leaf = check_issued_chain(chain, SID, key, ca.trust_bundle().roots)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_check_issued_chain_refuses_another_identity(ca: CertificateAuthority) -> None:
    key, chain = _issue(ca, SID)
    other = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/admin")
    with pytest.raises(NodeCredentialsError, match="asked for exactly"):
        check_issued_chain(chain, other, key, ca.trust_bundle().roots)


def test_check_issued_chain_refuses_a_certificate_for_another_key(ca: CertificateAuthority) -> None:
    _, chain = _issue(ca, SID)
    with pytest.raises(NodeCredentialsError, match="does not certify the key"):
        check_issued_chain(chain, SID, generate_key(), ca.trust_bundle().roots)


def test_check_issued_chain_refuses_an_unknown_root(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    key, chain = _issue(ca, SID)
    stranger = CertificateAuthority.load_or_create(tmp_path / "other")
    with pytest.raises(NodeCredentialsError, match="does not chain"):
        check_issued_chain(chain, SID, key, stranger.trust_bundle().roots)


def _creds(ca: CertificateAuthority) -> NodeCredentials:
    ident = node_identity("cluster.local", "node-1")
    key, chain = _issue(ca, ident)
    return NodeCredentials(
        node="node-1",
        trust_domain="cluster.local",
        controller_address="127.0.0.1:15012",
        join_address="127.0.0.1:15013",
        key_pem=key_pem(key),
        cert_chain_pem=chain,
        trust_bundle_pem=ca.trust_bundle().roots,
    )


def test_credentials_round_trip_with_a_private_key_file(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    creds = _creds(ca)
    save_node_credentials(tmp_path / "node", creds)
    assert load_node_credentials(tmp_path / "node") == creds
    assert stat.S_IMODE((tmp_path / "node" / "node-key.pem").stat().st_mode) == 0o600
    assert creds.identity == node_identity("cluster.local", "node-1")


def test_credentials_with_a_mismatched_key_are_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    save_node_credentials(tmp_path / "node", _creds(ca))
    (tmp_path / "node" / "node-key.pem").write_bytes(key_pem(generate_key()))
    with pytest.raises(NodeCredentialsError, match="does not match"):
        load_node_credentials(tmp_path / "node")


def test_missing_credentials_say_how_to_join(tmp_path: Path) -> None:
    with pytest.raises(NodeCredentialsError) as e:
        load_node_credentials(tmp_path / "nothing")
    assert e.value.hint and "veil node join" in e.value.hint


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1h30m", 5400), ("2d", 172800), ("1d2h3m4s", 93784)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)
    assert parse_duration(format_duration(timedelta(seconds=seconds))) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0", "0s", "1x", "h", "1.5h", "-5m", "1m1h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


@given(
    st.lists(st.binary(max_size=600), max_size=4),
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)
def test_pinning_survives_arbitrary_server_chains(chain: list[bytes], fp: str) -> None:
    # The chain comes from an unverified handshake: junk must give a clean error or None.
    assert trust_domain_hint(chain) is None or isinstance(trust_domain_hint(chain), str)
    with contextlib.suppress(NodeCredentialsError):
        select_pinned_root(chain, fp)


def _real_leaf_der() -> bytes:
    from datetime import UTC, datetime

    from controller.ca.certs import (
        build_leaf,
        build_self_signed_root,
        generate_p256_key,
        subject_key_id,
    )

    now = datetime.now(UTC)
    key = generate_p256_key()
    root = build_self_signed_root(key, "cluster.local", now, "t")
    leaf = build_leaf(
        public_key=generate_p256_key().public_key(),
        sans=[
            x509.DNSName("veil-controller"),
            x509.UniformResourceIdentifier("spiffe://cluster.local/veil/controller"),
        ],
        issuer=root,
        issuer_key=key,
        issuer_ski=subject_key_id(root),
        not_before=now,
        not_after=now + timedelta(hours=1),
        subject=x509.Name([]),
    )
    return leaf.public_bytes(serialization.Encoding.DER)


_LEAF_DER = _real_leaf_der()


def test_trust_domain_hint_reads_the_serving_leaf() -> None:
    assert trust_domain_hint([_LEAF_DER]) == "cluster.local"


@given(
    st.integers(min_value=0, max_value=len(_LEAF_DER) - 1), st.integers(min_value=1, max_value=255)
)
def test_trust_domain_hint_survives_corrupted_leaves(pos: int, flip: int) -> None:
    data = bytearray(_LEAF_DER)
    data[pos] ^= flip
    hint = trust_domain_hint([bytes(data)])
    assert hint is None or isinstance(hint, str)
