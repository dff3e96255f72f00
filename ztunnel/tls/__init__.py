"""TLS for HBONE: SSL contexts from workload certificates, and peer identity checks.

Public API:

* :func:`client_context` / :func:`server_context` ``(cred, bundle) -> ssl.SSLContext``:
  TLS 1.3 only, ALPN ``h2``, mutual authentication against the bundle roots;
  keys are loaded from memory (``memfd``), never written to disk.
* :class:`TlsContextCache`: ``.client(cred, bundle)`` / ``.server(cred, bundle)``
  reuse one context per identity until the certificate or the roots change.
* :func:`verify_peer` ``(ssl_object, expected, trust_domain) -> SpiffeId``: the
  post-handshake SPIFFE check (exactly one URI SAN, a P-256 leaf key, a workload
  identity in the same trust domain, literal match with ``expected`` when given). :func:`check_alpn` refuses anything but h2.
* Errors: :class:`TlsError` > :class:`CredentialError`, :class:`PeerVerificationError`.
"""

from __future__ import annotations

from .context import (
    ALPN_H2,
    Role,
    TlsContextCache,
    WorkloadCredential,
    client_context,
    server_context,
)
from .errors import CredentialError, PeerVerificationError, TlsError
from .verify import check_alpn, identity_from_der, verify_peer

__all__ = [
    "ALPN_H2",
    "CredentialError",
    "PeerVerificationError",
    "Role",
    "TlsContextCache",
    "TlsError",
    "WorkloadCredential",
    "check_alpn",
    "client_context",
    "identity_from_der",
    "server_context",
    "verify_peer",
]
