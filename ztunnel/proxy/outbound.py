"""The outbound listener (15001): connections captured from local enrolled pods.

For each accepted connection: the original destination is ``getsockname()``,
the source workload is the local enrolled workload owning ``getpeername()``'s
IP, and :func:`ztunnel.proxy.route` says what to do:

* ``Hbone``: open a CONNECT stream through the pooled mTLS HTTP/2 connections
  to the destination's ztunnel, presenting the *source* workload's certificate
  and requiring the destination workload's identity; ``forwarded`` carries the
  client address. Nothing is relayed before the peer answers 200, so a client
  the destination denies is reset before it sees a byte;
* ``ViaWaypoint``: the same CONNECT, to a replica of the destination's
  waypoint (its IP, port 15008, its identity required) with the original
  destination as the authority; the waypoint authorizes each HTTP request
  and forwards under its own identity;
* ``SameNode``: both ends live here, so this ztunnel enforces the destination's
  policy on the source identity itself and connects directly, from the
  client's IP, without TLS (nothing leaves the node);
* ``Passthrough``: the destination is outside the mesh; connect to it directly
  with the ztunnel's mark so the node's steering lets it out;
* ``Refuse``: reset the client at once (RST) and log why.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Coroutine
from typing import Any

from controller.api.spiffe import SpiffeId
from node.policy import Connection, authorize
from ztunnel.errors import CertificateError
from ztunnel.hbone import ConnectRefused, HboneClientPool, HboneError, HboneStream
from ztunnel.hbone import relay as relay_stream
from ztunnel.identity import CertificateSource

from .connections import ConnectionInfo, Direction, LiveConnection
from .context import ProxyContext, proxied, refuse
from .errors import FLAG_NO_ROUTE, FLAG_POLICY_DENIED, NoRouteError, TunnelError
from .relay import RelayResult, TunnelCounters, relay_sockets, tunnel_result
from .route import Hbone, Passthrough, Refuse, SameNode, ViaWaypoint, route
from .sockets import Address, connect_to_pod, connect_upstream, local_address, peer_address, reset
from .splice import SameNodeSplice

__all__ = ["OutboundProxy"]

log = logging.getLogger("veil.ztunnel.proxy")


class OutboundProxy:
    """Serves the outbound capture listener for one ztunnel.

    ``cert_timeout`` bounds how long a connection waits for its source
    workload's first certificate. ``peer_hbone_port`` overrides the HBONE port
    dialled on peers (15008 unless a test runs several ztunnels on one host).
    """

    def __init__(
        self,
        ctx: ProxyContext,
        certs: CertificateSource,
        pool: HboneClientPool,
        *,
        cert_timeout: float = 10.0,
        peer_hbone_port: int | None = None,
        splice: SameNodeSplice | None = None,
    ) -> None:
        self._ctx = ctx
        # Same-node kernel fast path (None: the Python relay carries same-node bytes).
        self._splice = splice
        self._certs = certs
        self.pool = pool
        self._cert_timeout = cert_timeout
        self._peer_port = peer_hbone_port

    def handle(self, sock: socket.socket) -> Coroutine[Any, Any, None] | None:
        """Handles one connection accepted on 15001; owns ``sock``.

        Routing is synchronous: a refused connection is reset here and None is
        returned (no task needed); otherwise the returned coroutine proxies the
        connection. Fewer coroutine frames per live connection: each one stays
        in memory for the connection's whole life.
        """
        ctx = self._ctx
        try:
            src = peer_address(sock)
            dst = local_address(sock)
        except OSError:
            sock.close()
            return None
        snap = ctx.store.current
        if dst.port in ctx.own_ports and snap.workload_by_ip(dst.ip) is None:
            # Addressed to a ztunnel listener itself (not steered): relaying it
            # would connect the ztunnel to itself.
            info = ConnectionInfo(Direction.OUTBOUND, src, dst, "refuse")
            refuse(ctx, sock, info, "connection addressed to the ztunnel itself", FLAG_NO_ROUTE)
            return None
        decision = route(snap, src.ip, dst.ip, dst.port, choose=ctx.choose)
        if isinstance(decision, Refuse):
            info = ConnectionInfo(
                Direction.OUTBOUND, src, dst, "refuse", src_workload=decision.source
            )
            # Debug only: the access log line (verdict, reason, policy) is the one
            # record of a deny.
            log.debug("refused outbound %s -> %s: %s", src, dst, decision.reason)
            refuse(ctx, sock, info, decision.reason, FLAG_NO_ROUTE)
            return None
        src_identity = decision.source.identity
        if isinstance(decision, Hbone | ViaWaypoint):
            return self._hbone(sock, src, decision, src_identity)
        if isinstance(decision, SameNode):
            return self._same_node(sock, src, decision, src_identity)
        return self._passthrough(sock, src, decision, src_identity)

    def _hbone(
        self,
        sock: socket.socket,
        src: Address,
        decision: Hbone | ViaWaypoint,
        src_identity: SpiffeId,
    ) -> Coroutine[Any, Any, None]:
        ctx = self._ctx
        target = Address(decision.dst_ip, decision.dst_port)
        info = ConnectionInfo(
            Direction.OUTBOUND,
            src,
            target,
            decision.kind,
            src_workload=decision.source,
            dst_workload=decision.destination,
            src_identity=src_identity,
            dst_identity=decision.expected_identity,
            service=decision.service,
        )
        hbone_ip, hbone_port = decision.hbone_addr
        if self._peer_port is not None and isinstance(decision, Hbone):
            # A test override for peer ztunnels; a waypoint listens where
            # its Workload says.
            hbone_port = self._peer_port

        async def relay(conn: LiveConnection) -> RelayResult:
            try:
                stream = await self._open(conn, decision, src, src_identity, hbone_ip, hbone_port)
            except BaseException:
                # Nothing was relayed: the client learns at once, by a reset,
                # and never sees a byte from anywhere.
                reset(sock)
                raise
            conn.counters = TunnelCounters(stream, local_is_client=True)
            return tunnel_result(await relay_stream(stream, sock), local_is_client=True)

        return proxied(ctx, info, relay)

    async def _open(
        self,
        conn: LiveConnection,
        decision: Hbone | ViaWaypoint,
        src: Address,
        src_identity: SpiffeId,
        hbone_ip: str,
        hbone_port: int,
    ) -> HboneStream:
        cert = self._certs.get(src_identity)
        if cert is None:
            try:
                cert = await self._certs.fetch(src_identity, timeout=self._cert_timeout)
            except CertificateError as e:
                raise NoRouteError(
                    f"no certificate for source {src_identity}: {e.message}",
                    hint=e.hint or "check the controller is reachable",
                ) from None
        try:
            return await self.pool.open_stream(
                cert,
                hbone_ip,
                hbone_port,
                decision.expected_identity,
                (decision.dst_ip, decision.dst_port),
                forwarded_for=(src.ip, src.port),
            )
        except ConnectRefused as e:
            if e.status == 401:
                conn.verdict = f"deny: {e.message} (by the destination's policy)"
            raise TunnelError(e.message, hint=e.hint, status=e.status) from None
        except HboneError as e:
            raise TunnelError(e.message, hint=e.hint, status=None) from None

    def _same_node(
        self, sock: socket.socket, src: Address, decision: SameNode, src_identity: SpiffeId
    ) -> Coroutine[Any, Any, None] | None:
        """Enforces the destination's policy here and connects locally, without TLS."""
        ctx = self._ctx
        dest = decision.destination
        target = Address(decision.dst_ip, decision.dst_port)
        info = ConnectionInfo(
            Direction.OUTBOUND,
            src,
            target,
            "same_node",
            src_workload=decision.source,
            dst_workload=dest,
            src_identity=src_identity,
            dst_identity=dest.identity,
            service=decision.service,
        )
        authz = Connection(
            src_ip=src.ip, dst_ip=target.ip, dst_port=target.port, src_identity=src_identity
        )
        verdict = authorize(authz, ctx.store.current, dest)
        if not verdict.allowed:
            # Debug only: the access log line (verdict, reason, policy) is the one
            # record of a deny.
            log.debug("refused same-node %s -> %s: %s", src, target, verdict.reason)
            refuse(ctx, sock, info, verdict.reason, FLAG_POLICY_DENIED, policy=verdict.policy)
            return None

        async def relay(conn: LiveConnection) -> RelayResult:
            try:
                upstream = await connect_to_pod(ctx, target, src.ip)
            except BaseException:
                reset(sock)
                raise
            if self._splice is not None and self._splice.promote:
                return await self._splice.relay_then_splice(sock, upstream, conn)
            if self._splice is not None:
                spliced = await self._splice.relay(sock, upstream, conn)
                if spliced is not None:
                    return spliced
            return await relay_sockets(sock, upstream, conn.track_bytes())

        return proxied(ctx, info, relay, authz=authz, policy=verdict.policy)

    def _passthrough(
        self, sock: socket.socket, src: Address, decision: Passthrough, src_identity: SpiffeId
    ) -> Coroutine[Any, Any, None]:
        ctx = self._ctx
        target = Address(decision.dst_ip, decision.dst_port)
        info = ConnectionInfo(
            Direction.OUTBOUND,
            src,
            target,
            "passthrough",
            src_workload=decision.source,
            dst_workload=decision.destination,
            src_identity=src_identity,
            service=decision.service,
        )

        async def relay(conn: LiveConnection) -> RelayResult:
            try:
                upstream = await connect_upstream(
                    target, mark=ctx.mark, timeout=ctx.connect_timeout
                )
            except BaseException:
                reset(sock)
                raise
            return await relay_sockets(sock, upstream, conn.track_bytes())

        return proxied(ctx, info, relay, verdict=f"allow: {decision.reason or 'passthrough'}")
