"""What the proxies need from whoever holds the workload certificates.

In a single-process ztunnel that is the :class:`~ztunnel.identity.CertManager`
itself; in a worker process it is the set of certificates the supervisor
pushed (:mod:`ztunnel.workers.certs`). The proxies depend on this protocol
only, so neither knows which one it is talking to.
"""

from __future__ import annotations

from typing import Protocol

from controller.api.spiffe import SpiffeId

from .certificate import WorkloadCertificate

__all__ = ["CertificateSource"]


class CertificateSource(Protocol):
    def get(self, identity: SpiffeId) -> WorkloadCertificate | None:
        """The current, unexpired certificate for ``identity``, if one is held."""
        ...

    async def fetch(self, identity: SpiffeId, timeout: float | None = None) -> WorkloadCertificate:
        """A valid certificate, waiting for the first one; raises CertificateError."""
        ...
