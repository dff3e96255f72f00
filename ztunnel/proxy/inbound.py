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
  registered for policy re-checks, and logged. The relay runs on transport
  callbacks (:func:`~ztunnel.hbone.start_relay`): a held connection keeps no
  task or coroutine frame (about a third of what one cost before).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from node.policy import Connection
from ztunnel.errors import CertificateError
from ztunnel.hbone import CloseReason, HboneConfig, HboneServer, InboundStream, start_relay
from ztunnel.hbone import RelayResult as TunnelResult
from ztunnel.hbone.connect import STATUS_DENIED, STATUS_UNAVAILABLE
from ztunnel.identity import CertificateSource, WorkloadCertificate
from ztunnel.tls import TlsContextCache

from .connections import FLAG_DOWNSTREAM_CLOSED, ConnectionInfo, Direction, LiveConnection
from .context import ProxyContext, refuse
from .decide import Reject, decide_inbound
from .errors import FLAG_POLICY_DENIED, UpstreamConnectError
from .relay import TunnelCounters, tunnel_result
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
        """Decides one CONNECT at once; returns the coroutine that dials the pod
        and starts the relay, or None when it was answered with an error here."""
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
        return self._admit(stream, info, client_ip, decision.authz, decision.policy)

    async def _admit(
        self,
        stream: InboundStream,
        info: ConnectionInfo,
        client_ip: str | None,
        authz: Connection | None,
        policy: str | None,
    ) -> None:
        """Registers the connection, dials the pod and starts the relay, then
        returns: the held connection lives on transport callbacks, and
        :func:`_relayed` writes its access log line when it ends. (A task and
        four coroutine frames per held connection cost about 2 KB each.)"""
        ctx = self._ctx
        conn = ctx.registry.add(info, authz=authz)  # closing it cancels this task
        ctx.metrics.connection_opened(info.labels())
        try:
            sock = await connect_to_pod(ctx, info.dst, client_ip)
            conn.counters = TunnelCounters(stream, local_is_client=False)
            done = await start_relay(stream, sock)
        except UpstreamConnectError as e:
            stream.reject(STATUS_UNAVAILABLE, e.message)
            _closed(ctx, conn, policy, e.message, e.flags)
            return
        except asyncio.CancelledError:
            # Closed from outside while dialling (policy re-check, shutdown):
            # as proxied() does, log and end normally; the server answers the stream.
            if conn.close_reason is None:
                conn.close("cancelled", FLAG_DOWNSTREAM_CLOSED)
            _closed(ctx, conn, policy, conn.close_reason, None)
            return
        except Exception as e:
            log.exception("connection %d (%s -> %s) failed", conn.id, info.src, info.dst)
            _closed(ctx, conn, policy, f"{type(e).__name__}: {e}", None)
            return  # the server answers 503, or resets a stream already answered
        # From here on, closing the connection cancels this future (see _relayed).
        conn.task = done
        done.add_done_callback(partial(_relayed, ctx, stream, conn, policy))

    async def shutdown(self, grace: float) -> None:
        """GOAWAY to every HBONE peer, drain for ``grace`` seconds, reset the rest."""
        await self.server.shutdown(grace)


def _relayed(
    ctx: ProxyContext,
    stream: InboundStream,
    conn: LiveConnection,
    policy: str | None,
    done: asyncio.Future[TunnelResult],
) -> None:
    """The end of a held inbound connection: its relay finished, or the
    connection was closed from outside (the future was cancelled)."""
    if done.cancelled():
        if conn.close_reason is None:
            conn.close("cancelled", FLAG_DOWNSTREAM_CLOSED)
        stream.close(CloseReason.CANCELLED, conn.close_reason or "cancelled")
        _closed(ctx, conn, policy, conn.close_reason, None)
        return
    result = tunnel_result(done.result(), local_is_client=False)
    _closed(ctx, conn, policy, result.error, result.flags)


def _closed(
    ctx: ProxyContext,
    conn: LiveConnection,
    policy: str | None,
    error: str | None,
    flags: str | None,
) -> None:
    """Unregisters ``conn`` and reports it (metrics, access log), as proxied() does."""
    ctx.registry.remove(conn)
    with contextlib.suppress(Exception):
        ctx.metrics.connection_closed(conn.report(error=error, response_flags=flags, policy=policy))
