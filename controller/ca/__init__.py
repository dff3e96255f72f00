"""The controller's certificate authority.

Owns the signing authorities (a generated P-256 root or a user-supplied CA), SVID
issuance from node CSRs under the SPIFFE X.509-SVID rules, the trust bundle with
several roots, and root rotation with pruning once a retired root's certificates
have all expired.
"""

from __future__ import annotations

from .authority import (
    DEFAULT_ISSUED_SLACK,
    AuthorityInfo,
    CertificateAuthority,
    Clock,
    IssuedCertificate,
    controller_identity,
    prune_expired,
    utc_now,
)
from .csr import validate_csr
from .store import AuthorityRecord, CaState, CaStore, FileCaStore

__all__ = [
    "DEFAULT_ISSUED_SLACK",
    "AuthorityInfo",
    "AuthorityRecord",
    "CaState",
    "CaStore",
    "CertificateAuthority",
    "Clock",
    "FileCaStore",
    "IssuedCertificate",
    "controller_identity",
    "prune_expired",
    "utc_now",
    "validate_csr",
]
