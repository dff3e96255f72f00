"""The error family of :mod:`ztunnel.tls`: building contexts and checking peers."""

from __future__ import annotations

from ztunnel.errors import ZtunnelError

__all__ = ["CredentialError", "PeerVerificationError", "TlsError"]


class TlsError(ZtunnelError):
    """Base of every error :mod:`ztunnel.tls` raises."""


class CredentialError(TlsError):
    """A workload certificate, its key or the trust bundle could not be loaded
    into an SSL context (malformed PEM, key not matching the leaf, empty bundle)."""


class PeerVerificationError(TlsError):
    """The TLS peer's certificate chained to the trust bundle but is not the
    identity required: no or several URI SANs, another trust domain, a CA
    certificate as leaf, or a SPIFFE ID different from the expected one. Also
    raised when the peer did not negotiate ALPN ``h2``."""
