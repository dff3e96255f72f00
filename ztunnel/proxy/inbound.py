"""The HBONE listener (15008): mTLS CONNECT tunnels from peer ztunnels to local pods.

The TLS and HTTP/2 work is :class:`ztunnel.hbone.HboneServer`'s: it picks the
certificate of the local workload owning the connection's L3 destination
(``getsockname()``), verifies the peer's SPIFFE ID, and refuses CONNECTs whose
authority IP is not that destination (400). Each remaining CONNECT is decided
by :func:`~ztunnel.proxy.decide.decide_inbound` (destination, trusted client
address, policy); then this module acts on the decision:

* ``Reject``: answer 503 (no route) or 401 (denied) before any pod byte flows;
* ``Admit``: dial the pod, from the original client IP when the client
  address was verified (IP_TRANSPARENT, SO_MARK), so the application sees the
  real caller; a failed dial answers 503. The stream is then relayed,
  registered for policy re-checks, and logged.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from ztunnel.errors import CertificateError
from ztunnel.hbone import HboneConfig, HboneServer, InboundStream
from ztunnel.hbone import relay as relay_stream
from ztunnel.hbone.connect import STATUS_DENIED, STATUS_UNAVAILABLE
from ztunnel.identity import CertificateSource, WorkloadCertificate
from ztunnel.tls import TlsContextCache

from .connections import ConnectionInfo, Direction, LiveConnection
from .context import ProxyContext, proxied, refuse
from .decide import Reject, decide_inbound
from .errors import FLAG_POLICY_DENIED, UpstreamConnectError
from .relay import RelayResult, TunnelCounters, tunnel_result
from .sockets import Address, connect_to_pod

__all__ = ["InboundProxy"]

log = logging.getLogger("veil.ztunnel.proxy")


class InboundProxy:
    """Serves the HBONE listener for one ztunnel."""

    def __init__(
        self,
        ctx: ProxyContext,
        certs: CertificateSource,
        trust_bundle: Callable[[], TrustBundle],
        *,
        config: HboneConfig | None = None,
        contexts: TlsContextCache | None = None,
        cert_timeout: float = 10.0,
    ) -> None:
        self._ctx = ctx
        self._certs = certs
        self._cert_timeout = cert_timeout
        self.server = HboneServer(
            self._select_cert, trust_bundle, self._handle, config=config, contexts=contexts
        )

    def handle(self, sock: socket.socket) -> Coroutine[Any, Any, None] | None:
        """Listener entry point: the coroutine serving one accepted connection
        (owns ``sock``), or None when it was closed at once."""
        try:
            dst_ip = sock.getsockname()[0]
        except OSError:
            sock.close()
            return None
        workload = self._ctx.store.current.local_workload_by_ip(dst_ip)
        if workload is not None and self._certs.get(workload.identity) is None:
            return self._serve_after_cert(sock, workload.identity, dst_ip)
        return self.server.serve_connection(sock)

    async def _serve_after_cert(self, sock: socket.socket, identity: SpiffeId, dst_ip: str) -> None:
        """The TLS server needs the destination workload's certificate at once;
        a workload that just arrived may not have one yet, so wait for it here
        (bounded) rather than refuse the first connections."""
        try:
            await self._certs.fetch(identity, timeout=self._cert_timeout)
        except CertificateError as e:
            log.warning("hbone: no certificate for %s: %s", dst_ip, e)
        except BaseException:
            sock.close()
            raise
        await self.server.serve_connection(sock)

    def _select_cert(self, dst_ip: str) -> WorkloadCertificate | None:
        workload = self._ctx.store.current.local_workload_by_ip(dst_ip)
        if workload is None:
            return None
        cert = self._certs.get(workload.identity)
        if cert is None:
            log.warning(
                "hbone: no certificate yet for %s (%s); refusing", workload.identity, dst_ip
            )
        return cert

    def _handle(self, stream: InboundStream) -> Coroutine[Any, Any, None] | None:
        """Decides one CONNECT at once; returns the coroutine relaying it, or None
        when it was answered with an error here."""
        ctx = self._ctx
        req = stream.request
        snapshot = ctx.store.current
        decision = decide_inbound(snapshot, req)
        dst = Address(req.host, req.port)
        dest = decision.destination
        info = ConnectionInfo(
            Direction.INBOUND,
            decision.client,
            dst,
            "inbound",
            src_workload=decision.source,
            dst_workload=dest,
            src_identity=req.peer_identity,
            dst_identity=dest.identity if dest is not None else None,
            service=ctx.metrics.inbound_service(snapshot, dest),
        )
        if isinstance(decision, Reject):
            # Debug only: the access log line (verdict, reason, policy) is the one
            # record of a deny.
            log.debug(
                "hbone CONNECT %s from %s (%s) refused: %s",
                req.authority,
                req.peer_identity,
                decision.client.ip,
                decision.reason,
            )
            denied = decision.flags == FLAG_POLICY_DENIED
            stream.reject(STATUS_DENIED if denied else STATUS_UNAVAILABLE, decision.reason)
            refuse(ctx, None, info, decision.reason, decision.flags, policy=decision.policy)
            return None
        client_ip = decision.client.ip if decision.transparent else None

        async def relay(conn: LiveConnection) -> RelayResult:
            try:
                sock = await connect_to_pod(ctx, dst, client_ip)
            except UpstreamConnectError as e:
                stream.reject(STATUS_UNAVAILABLE, e.message)
                raise
            conn.counters = TunnelCounters(stream, local_is_client=False)
            return tunnel_result(await relay_stream(stream, sock), local_is_client=False)

        return proxied(ctx, info, relay, authz=decision.authz, policy=decision.policy)

    async def shutdown(self, grace: float) -> None:
        """GOAWAY to every HBONE peer, drain for ``grace`` seconds, reset the rest."""
        await self.server.shutdown(grace)
