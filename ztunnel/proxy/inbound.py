"""The HBONE listener (15008): mTLS CONNECT tunnels from peer ztunnels to local pods.

The TLS and HTTP/2 work is :class:`ztunnel.hbone.HboneServer`'s: it picks the
certificate of the local workload owning the connection's L3 destination
(``getsockname()``), verifies the peer's SPIFFE ID, and refuses CONNECTs whose
authority IP is not that destination (400). For each remaining CONNECT this
module decides and relays:

1. the destination must be an enrolled workload of this node;
2. the original client address comes from the ``forwarded`` header, but only
   when the snapshot says that IP belongs to a workload with the *verified*
   peer identity (see :func:`inbound_source`); otherwise 401;
3. the destination's AuthorizationPolicy is evaluated for the peer identity,
   source IP and port: deny answers 401 before any pod byte flows;
4. the pod is dialled from the original client IP (IP_TRANSPARENT, SO_MARK),
   so the application sees the real caller; a failed dial answers 503;
5. the stream is relayed, registered for policy re-checks, and logged.

Choice and risk of step 2: ``forwarded`` is written by the *source* ztunnel,
which is authenticated only as the workload identity whose certificate it
presented. Taken blindly, a compromised node holding any workload certificate
could claim any source IP, defeating ``ipBlocks`` rules and lying to the
application about its caller. Binding the claimed IP to the authenticated
identity through the control-plane state closes that hole; the price is that a
pod the destination node does not know yet (a few hundred milliseconds after
it started) is refused until the state arrives, and the client retries. A
request without ``forwarded`` uses the HBONE connection's own source address
and is connected from this node's address, not transparently.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from controller.api.model import TrustBundle
from controller.api.spiffe import InvalidSpiffeId, SpiffeId
from node.state import Snapshot
from ztunnel.errors import CertificateError
from ztunnel.hbone.config import HboneConfig
from ztunnel.hbone.connect import STATUS_DENIED, STATUS_UNAVAILABLE, ConnectRequest
from ztunnel.hbone.server import HboneServer, InboundStream
from ztunnel.hbone.stream import CloseReason
from ztunnel.hbone.stream import relay as relay_stream
from ztunnel.identity import CertManager, WorkloadCertificate
from ztunnel.policy import Connection, authorize
from ztunnel.tls import TlsContextCache

from .connections import (
    FLAG_DOWNSTREAM_CLOSED,
    FLAG_NO_ROUTE,
    FLAG_POLICY_DENIED,
    FLAG_UPSTREAM_CLOSED,
    ConnectionInfo,
    Direction,
    LiveConnection,
)
from .context import ProxyContext, intern_identity, proxied, refuse
from .errors import UpstreamConnectError
from .plaintext import connect_to_pod
from .relay import RelayResult
from .sockets import Address, connect_upstream

__all__ = ["InboundProxy", "InboundSource", "inbound_source", "stream_result"]

log = logging.getLogger("veil.ztunnel.proxy")


@dataclass(frozen=True, slots=True)
class InboundSource:
    """Where an inbound tunnel's client is, and whether to connect as it."""

    ip: str
    port: int
    transparent: bool


def inbound_source(snapshot: Snapshot, request: ConnectRequest) -> InboundSource | str:
    """The client address to authorize and to connect from, or why the request
    is refused (pure).

    The ``forwarded`` address is trusted only when it belongs to a workload
    whose identity is the verified peer identity.
    """
    if request.forwarded_for is None:
        ip, port = request.peer_addr
        return InboundSource(ip, port, transparent=False)
    ip, fport = request.forwarded_for
    owner = snapshot.workload_by_ip(ip)
    if owner is None:
        return f"forwarded client {ip} is not a known workload"
    try:
        owner_identity = owner.identity
    except InvalidSpiffeId:
        return f"forwarded client {ip} ({owner.key}) has no valid identity"
    if owner_identity != request.peer_identity:
        return (
            f"forwarded client {ip} belongs to {owner_identity}, "
            f"not to the authenticated peer {request.peer_identity}"
        )
    return InboundSource(ip, fport or 0, transparent=True)


_FLAGS = {
    CloseReason.SHUTDOWN: FLAG_DOWNSTREAM_CLOSED,
    CloseReason.PEER_RESET: FLAG_UPSTREAM_CLOSED,
    CloseReason.CONNECTION_LOST: FLAG_UPSTREAM_CLOSED,
}


def stream_result(
    bytes_received: int, bytes_sent: int, reason: CloseReason, detail: str
) -> RelayResult:
    """A tunnel's end as the proxy reports it (error None when it completed)."""
    if reason is CloseReason.COMPLETED:
        return RelayResult(bytes_received, bytes_sent)
    return RelayResult(bytes_received, bytes_sent, f"{reason.value}: {detail}", _FLAGS.get(reason))


class _InboundCounters:
    """Live byte counts of a server-side stream, in client-to-server terms."""

    __slots__ = ("_stream",)

    def __init__(self, stream: InboundStream) -> None:
        self._stream = stream

    @property
    def up(self) -> int:  # client -> pod: what the tunnel delivered locally
        return self._stream.bytes_down

    @property
    def down(self) -> int:  # pod -> client
        return self._stream.bytes_up


class InboundProxy:
    """Serves the HBONE listener for one ztunnel."""

    def __init__(
        self,
        ctx: ProxyContext,
        certs: CertManager,
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

    async def handle(self, sock: socket.socket) -> None:
        """Listener entry point: serve one accepted connection (owns it).

        The TLS server needs the destination workload's certificate at once;
        a workload that just arrived may not have one yet, so wait for it here
        (bounded) rather than refuse the first connections.
        """
        try:
            dst_ip = sock.getsockname()[0]
        except OSError:
            sock.close()
            return
        workload = self._ctx.store.current.local_workload_by_ip(dst_ip)
        if workload is not None:
            try:
                identity = workload.identity
                if self._certs.get(identity) is None:
                    await self._certs.fetch(identity, timeout=self._cert_timeout)
            except (InvalidSpiffeId, CertificateError) as e:
                log.warning("hbone: no certificate for %s: %s", dst_ip, e)
            except BaseException:
                sock.close()
                raise
        await self.server.serve_connection(sock)

    def _select_cert(self, dst_ip: str) -> WorkloadCertificate | None:
        workload = self._ctx.store.current.local_workload_by_ip(dst_ip)
        if workload is None:
            return None
        try:
            identity = workload.identity
        except InvalidSpiffeId:
            return None
        cert = self._certs.get(identity)
        if cert is None:
            log.warning("hbone: no certificate yet for %s (%s); refusing", identity, dst_ip)
        return cert

    def _handle(self, stream: InboundStream) -> Coroutine[Any, Any, None] | None:
        """Decides one CONNECT at once; returns the coroutine relaying it, or None
        when it was answered with an error here."""
        ctx = self._ctx
        req = stream.request
        snap = ctx.store.current
        dst = Address(req.host, req.port)
        dest = snap.local_workload_by_ip(req.host)
        dst_identity: SpiffeId | None = None
        if dest is not None:
            try:
                dst_identity = intern_identity(dest.identity)
            except InvalidSpiffeId:
                dst_identity = None
        source = inbound_source(snap, req)
        src = (
            Address(source.ip, source.port)
            if isinstance(source, InboundSource)
            else Address(req.peer_addr[0], req.peer_addr[1])
        )
        info = ConnectionInfo(
            Direction.INBOUND,
            src,
            dst,
            "inbound",
            src_workload=snap.workload_by_ip(src.ip),
            dst_workload=dest,
            src_identity=req.peer_identity,
            dst_identity=dst_identity,
        )
        if dest is None:
            reason = f"{req.host} is not an enrolled workload of this node"
            stream.reject(STATUS_UNAVAILABLE, reason)
            refuse(ctx, None, info, reason, FLAG_NO_ROUTE)
            return None
        if not isinstance(source, InboundSource):
            log.warning("hbone CONNECT from %s refused: %s", req.peer_identity, source)
            stream.reject(STATUS_DENIED, source)
            refuse(ctx, None, info, source, FLAG_POLICY_DENIED)
            return None
        authz = Connection(
            src_ip=source.ip, dst_ip=req.host, dst_port=req.port, src_identity=req.peer_identity
        )
        verdict = authorize(authz, snap, dest)
        if not verdict.allowed:
            log.info(
                "hbone CONNECT %s from %s (%s) denied: %s",
                req.authority,
                req.peer_identity,
                source.ip,
                verdict.reason,
            )
            stream.reject(STATUS_DENIED, verdict.reason)
            refuse(ctx, None, info, verdict.reason, FLAG_POLICY_DENIED, policy=verdict.policy)
            return None

        async def relay(conn: LiveConnection) -> RelayResult:
            try:
                if source.transparent:
                    sock = await connect_to_pod(ctx, dst, source.ip)
                else:
                    sock = await connect_upstream(dst, mark=ctx.mark, timeout=ctx.connect_timeout)
            except UpstreamConnectError as e:
                stream.reject(STATUS_UNAVAILABLE, e.message)
                raise
            conn.counters = _InboundCounters(stream)
            result = await relay_stream(stream, sock)
            return stream_result(result.bytes_down, result.bytes_up, result.reason, result.detail)

        return proxied(ctx, info, relay, authz=authz, policy=verdict.policy)

    async def shutdown(self, grace: float) -> None:
        """GOAWAY to every HBONE peer, drain for ``grace`` seconds, reset the rest."""
        await self.server.shutdown(grace)
