"""Workload identities on this node: keys, CSRs, verified certificates, rotation.

:class:`CertManager` is the component; :class:`WorkloadCertificate` is what the
TLS layer (``ztunnel.tls``) builds contexts from.
"""

from .certificate import (
    WorkloadCertificate,
    build_csr,
    chain_still_trusted,
    generate_key,
    key_pem,
    verify_issued,
)
from .manager import CertificateSigner, CertManager, CertStatus, Clock, SystemClock
from .source import CertificateSource

__all__ = [
    "CertManager",
    "CertStatus",
    "CertificateSigner",
    "CertificateSource",
    "Clock",
    "SystemClock",
    "WorkloadCertificate",
    "build_csr",
    "chain_still_trusted",
    "generate_key",
    "key_pem",
    "verify_issued",
]
