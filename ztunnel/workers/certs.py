"""The certificates a worker process holds: whatever the supervisor pushed.

A worker never talks to the controller. The supervisor's
:class:`~ztunnel.identity.CertManager` fetches and rotates every local
workload's certificate and pushes each one (key included, over the private
socketpair) to every worker. :class:`PushedCertificates` is the worker's side:
it answers the proxies' ``get`` from what was pushed, and turns a ``fetch`` for
an identity it lacks into one request to the supervisor, so N workers never
mean N certificate requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from controller.api.spiffe import SpiffeId

from ..errors import CertificateError
from ..identity import WorkloadCertificate

__all__ = ["PushedCertificates"]

log = logging.getLogger("veil.ztunnel.worker")


class PushedCertificates:
    """Satisfies :class:`~ztunnel.identity.CertificateSource` from pushed values.

    ``want`` is called (at most once per identity while a request is open) to
    ask the supervisor for an identity this worker has no certificate for.
    """

    def __init__(self, want: Callable[[SpiffeId], None]) -> None:
        self._want = want
        self._certs: dict[SpiffeId, WorkloadCertificate] = {}
        self._waiters: dict[SpiffeId, list[asyncio.Future[WorkloadCertificate]]] = {}

    def get(self, identity: SpiffeId) -> WorkloadCertificate | None:
        cert = self._certs.get(identity)
        if cert is None or cert.expired(datetime.now(UTC)):
            return None
        return cert

    def identities(self) -> frozenset[SpiffeId]:
        return frozenset(self._certs)

    async def fetch(self, identity: SpiffeId, timeout: float | None = None) -> WorkloadCertificate:
        cert = self.get(identity)
        if cert is not None:
            return cert
        fut: asyncio.Future[WorkloadCertificate] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(identity, [])
        first = not waiters
        waiters.append(fut)
        if first:
            self._want(identity)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise CertificateError(
                f"no certificate for {identity} after {timeout}s",
                hint="check the controller is reachable and the workload runs on this node",
            ) from None
        finally:
            left = self._waiters.get(identity)
            if left is not None and fut in left:
                left.remove(fut)
                if not left:
                    del self._waiters[identity]

    def install(self, cert: WorkloadCertificate) -> None:
        """A certificate pushed by the supervisor (new, or a rotation)."""
        self._certs[cert.identity] = cert
        for fut in self._waiters.pop(cert.identity, []):
            if not fut.done():
                fut.set_result(cert)

    def drop(self, identity: SpiffeId) -> None:
        """The supervisor stopped tracking ``identity`` (the workload left)."""
        self._certs.pop(identity, None)

    def refused(self, identity: SpiffeId, reason: str) -> None:
        """The supervisor could not get a certificate for ``identity``."""
        for fut in self._waiters.pop(identity, []):
            if not fut.done():
                fut.set_exception(CertificateError(f"no certificate for {identity}: {reason}"))
