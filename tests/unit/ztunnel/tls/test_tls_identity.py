"""TLS contexts and SPIFFE peer checks, with handshakes run in memory (no sockets)."""

from __future__ import annotations

import ssl
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from ztunnel.tls import (
    CredentialError,
    PeerVerificationError,
    Role,
    TlsContextCache,
    check_alpn,
    client_context,
    identity_from_der,
    server_context,
    verify_peer,
)

TD = "cluster.local"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = "spiffe://cluster.local/ns/default/sa/server"


def handshake(cctx: ssl.SSLContext, sctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake between two SSLObjects over memory BIOs."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = cctx.wrap_bio(c_in, c_out, server_side=False)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, obj in enumerate((client, server)):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            # TLS 1.3: the server checks the client certificate after the client
            # finished; a rejection arrives as an alert on the client's next read.
            with pytest.raises(ssl.SSLWantReadError):
                client.read(1)
            return client, server
    raise AssertionError("handshake did not finish")


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_mutual_tls_verifies_both_identities(test_ca) -> None:  # type: ignore[no-untyped-def]
    bundle = test_ca.bundle()
    client, server = handshake(
        client_context(test_ca.issue([CLIENT]), bundle),
        server_context(test_ca.issue([SERVER]), bundle),
    )
    assert client.version() == "TLSv1.3"
    check_alpn(client)
    check_alpn(server)
    assert verify_peer(client, SpiffeId.parse(SERVER), TD) == SpiffeId.parse(SERVER)
    assert verify_peer(server, None, TD) == SpiffeId.parse(CLIENT)


def test_wrong_server_identity_is_refused(test_ca) -> None:  # type: ignore[no-untyped-def]
    bundle = test_ca.bundle()
    client, _ = handshake(
        client_context(test_ca.issue([CLIENT]), bundle),
        server_context(test_ca.issue(["spiffe://cluster.local/ns/default/sa/impostor"]), bundle),
    )
    with pytest.raises(
        PeerVerificationError, match=r"expected spiffe://cluster\.local/ns/default/sa/server"
    ):
        verify_peer(client, SpiffeId.parse(SERVER), TD)


def test_foreign_trust_domain_is_refused_both_ways(test_ca) -> None:  # type: ignore[no-untyped-def]
    bundle = test_ca.bundle()
    foreign = "spiffe://evil.example/ns/default/sa/server"
    client, server = handshake(
        client_context(test_ca.issue(["spiffe://evil.example/ns/x/sa/y"]), bundle),
        server_context(test_ca.issue([foreign]), bundle),
    )
    with pytest.raises(PeerVerificationError, match="trust domain"):
        verify_peer(client, SpiffeId.parse(foreign), TD)
    with pytest.raises(PeerVerificationError, match="trust domain"):
        verify_peer(server, None, TD)


def test_other_ca_and_expired_certificates_fail_the_handshake(test_ca, other_ca) -> None:  # type: ignore[no-untyped-def]
    bundle = test_ca.bundle()
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        handshake(
            client_context(test_ca.issue([CLIENT]), bundle),
            server_context(other_ca.issue([SERVER]), bundle),
        )
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        handshake(
            client_context(test_ca.issue([CLIENT]), bundle),
            server_context(test_ca.issue([SERVER], expired=True), bundle),
        )
    # A client certificate from another CA is refused by the server.
    with pytest.raises(ssl.SSLError):
        handshake(
            client_context(other_ca.issue([CLIENT]), bundle),
            server_context(test_ca.issue([SERVER]), bundle),
        )


def test_alpn_other_than_h2_is_refused(test_ca) -> None:  # type: ignore[no-untyped-def]
    bundle = test_ca.bundle()
    cctx = client_context(test_ca.issue([CLIENT]), bundle)
    cctx.set_alpn_protocols(["http/1.1"])
    client, server = handshake(cctx, server_context(test_ca.issue([SERVER]), bundle))
    with pytest.raises(PeerVerificationError, match="ALPN"):
        check_alpn(server)
    with pytest.raises(PeerVerificationError, match="ALPN"):
        check_alpn(client)


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        ([], "0 URI SANs"),
        ([SERVER, CLIENT], "2 URI SANs"),
        (["https://example.com/x"], "not a SPIFFE ID"),
        (["spiffe://cluster.local/ns/../sa/x"], "not a SPIFFE ID"),
    ],
)
def test_identity_from_der_refuses(test_ca, uris: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PeerVerificationError, match=message):
        identity_from_der(der(test_ca.issue(uris).chain_pem[0]))


def test_identity_from_der_refuses_ca_leaf_and_garbage(test_ca) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PeerVerificationError, match="CA certificate"):
        identity_from_der(der(test_ca.issue([SERVER], ca_leaf=True).chain_pem[0]))
    with pytest.raises(PeerVerificationError, match="cannot be parsed"):
        identity_from_der(b"\x30\x03garbage")
    assert identity_from_der(der(test_ca.issue([SERVER]).chain_pem[0])) == SpiffeId.parse(SERVER)


def test_contexts_are_tls13_only_and_require_peer_certificates(test_ca) -> None:  # type: ignore[no-untyped-def]
    bundle = test_ca.bundle()
    for ctx in (
        client_context(test_ca.issue([CLIENT]), bundle),
        server_context(test_ca.issue([SERVER]), bundle),
    ):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert not ctx.check_hostname


def test_bad_credentials_are_reported(test_ca) -> None:  # type: ignore[no-untyped-def]
    bundle = test_ca.bundle()
    a, b = test_ca.issue([CLIENT]), test_ca.issue([SERVER])
    with pytest.raises(CredentialError, match="key must be"):
        client_context(replace(a, key_pem=b.key_pem), bundle)
    with pytest.raises(CredentialError, match="no root"):
        client_context(a, TrustBundle(TD, ()))
    with pytest.raises(CredentialError, match="trust bundle"):
        client_context(
            a, TrustBundle(TD, (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",))
        )
    with pytest.raises(CredentialError, match="empty chain"):
        server_context(replace(a, chain_pem=()), bundle)


def test_context_cache_rebuilds_on_rotation_and_new_roots(test_ca, other_ca) -> None:  # type: ignore[no-untyped-def]
    cache = TlsContextCache(max_entries=2)
    bundle = test_ca.bundle()
    cert = test_ca.issue([CLIENT])
    first = cache.client(cert, bundle)
    assert cache.client(cert, bundle) is first
    assert cache.server(cert, bundle) is not first
    rotated = test_ca.issue([CLIENT])
    assert cache.client(rotated, bundle) is not first
    both = TrustBundle(TD, bundle.roots + other_ca.bundle().roots)
    assert cache.client(rotated, both) is not cache.get(Role.CLIENT, rotated, bundle)
    cache.client(test_ca.issue([SERVER]), bundle)
    assert len(cache) == 2  # bounded
    cache.forget(SpiffeId.parse(SERVER))
    assert len(cache) == 1
