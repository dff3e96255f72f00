"""Peer identity checks that OpenSSL cannot do: SPIFFE URI SANs and ALPN.

OpenSSL has already verified the chain to the trust bundle (and validity dates)
when these run. What is left is the SPIFFE X.509-SVID rules for the leaf:

* exactly one URI SAN, a valid SPIFFE ID; zero or several are refused;
* the leaf is not a CA, and its key is ECDSA P-256 (the only key Veil issues;
  RSA or other curves mean a certificate from somewhere else);
* the ID is a workload identity, ``/ns/<ns>/sa/<sa>``: a node identity
  (``/veil/node/<name>``, whose key sits on the node's disk) is for the
  controller API only and never a peer on HBONE;
* the ID's trust domain is ours; and when an identity is expected (the client
  side, which knows whom it dialled) the ID equals it, compared literally.

:func:`identity_from_der` is pure and table-tested; :func:`verify_peer` applies
it to a live ``ssl.SSLObject`` / ``ssl.SSLSocket``.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from controller.api.spiffe import InvalidSpiffeId, SpiffeId

from .context import ALPN_H2
from .errors import PeerVerificationError

__all__ = ["check_alpn", "identity_from_der", "verify_peer"]


def identity_from_der(der: bytes) -> SpiffeId:
    """The SPIFFE ID of a leaf certificate, enforcing the X.509-SVID leaf rules."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PeerVerificationError(
            "the peer certificate cannot be parsed", hint="the peer must present an X.509 SVID"
        ) from exc
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError as exc:  # duplicate or malformed extensions
        raise PeerVerificationError(
            f"the peer certificate has malformed extensions: {exc}"
        ) from exc
    if bc is not None and bc.ca:
        raise PeerVerificationError(
            "the peer presented a CA certificate as its leaf",
            hint="an SVID leaf must have basicConstraints cA=false",
        )
    _check_key(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise PeerVerificationError(
            f"the peer certificate has {len(uris)} URI SANs; an SVID has exactly one",
            hint="issue the workload certificate with a single spiffe:// URI SAN",
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise PeerVerificationError(
            f"the peer certificate's URI SAN is not a SPIFFE ID: {exc.message}",
            hint="the URI SAN must be spiffe://<trust-domain>/<path>",
        ) from exc


def _check_key(cert: x509.Certificate) -> None:
    try:
        key = cert.public_key()
    except ValueError as exc:  # an unsupported or malformed key
        raise PeerVerificationError(f"the peer certificate's key cannot be read: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"an EC {key.curve.name} key"
    else:
        size = getattr(key, "key_size", None)
        kind = f"a {type(key).__name__.removesuffix('PublicKey')} key" + (
            f" of {size} bits" if size else ""
        )
    raise PeerVerificationError(
        f"the peer certificate has {kind}; HBONE accepts only ECDSA P-256 leaves",
        hint="workload certificates must come from this mesh's CA, which issues P-256 keys",
    )


def check_alpn(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> None:
    """Refuse a connection that did not negotiate ALPN ``h2`` (HBONE never speaks h2c)."""
    selected = ssl_object.selected_alpn_protocol()
    if selected != ALPN_H2:
        raise PeerVerificationError(
            f"the peer negotiated ALPN {selected!r}; HBONE requires 'h2'",
            hint="the peer must offer ALPN h2 over TLS 1.3",
        )


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    expected: SpiffeId | None,
    trust_domain: str,
) -> SpiffeId:
    """Return the verified SPIFFE ID of the TLS peer, or raise PeerVerificationError.

    ``expected`` is the identity the client dialled (literal equality), or None
    on the server side, where any identity of ``trust_domain`` is acceptable.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerVerificationError(
            "the peer presented no certificate", hint="HBONE requires mutual TLS"
        )
    identity = identity_from_der(der)
    if identity.workload is None:
        what = "a node identity" if identity.node is not None else "not a workload identity"
        raise PeerVerificationError(
            f"the peer identity {identity} is {what}; HBONE peers must be workloads "
            "(spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)",
            hint="node certificates are for the controller API only; present the "
            "workload's own certificate",
        )
    if identity.trust_domain != trust_domain:
        raise PeerVerificationError(
            f"the peer identity {identity} is in trust domain {identity.trust_domain!r}, "
            f"not {trust_domain!r}",
            hint="peers must share this mesh's trust domain",
        )
    if expected is not None and identity != expected:
        raise PeerVerificationError(
            f"the peer identity is {identity}; expected {expected}",
            hint="the destination is serving another workload's certificate; check the "
            "workload registry",
        )
    return identity
