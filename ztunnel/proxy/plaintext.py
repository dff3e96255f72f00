"""The inbound plaintext listener (15006): traffic from outside the mesh to a
local enrolled pod.

Such a client has no verified identity. :func:`~ztunnel.proxy.decide.decide_plaintext`
applies the destination's PeerAuthentication mode (STRICT refuses) and its
AuthorizationPolicy with no principal; this module acts on the decision:
refused connections are reset (logged, counted), admitted ones are relayed to
the pod from the client's own address.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Coroutine
from typing import Any

from .connections import ConnectionInfo, Direction, LiveConnection
from .context import ProxyContext, proxied, refuse
from .decide import Reject, decide_plaintext
from .relay import RelayResult, relay_sockets
from .sockets import connect_to_pod, local_address, peer_address, reset

__all__ = ["PlaintextProxy"]

log = logging.getLogger("veil.ztunnel.proxy")


class PlaintextProxy:
    """Serves the inbound plaintext listener for one ztunnel."""

    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx

    def handle(self, sock: socket.socket) -> Coroutine[Any, Any, None] | None:
        """Handles one connection accepted on 15006; owns ``sock``.

        A refused connection is reset here and None is returned; otherwise the
        returned coroutine proxies it.
        """
        ctx = self._ctx
        try:
            src = peer_address(sock)
            dst = local_address(sock)
        except OSError:
            sock.close()  # the client is already gone
            return None
        snapshot = ctx.store.current
        decision = decide_plaintext(snapshot, src, dst, ctx.own_ports)
        dest = decision.destination
        info = ConnectionInfo(
            direction=Direction.INBOUND_PLAINTEXT,
            src=src,
            dst=dst,
            route="inbound_plaintext",
            src_workload=decision.source,
            dst_workload=dest,
            dst_identity=dest.identity if dest is not None else None,
            service=ctx.metrics.inbound_service(snapshot, dest),
        )
        if isinstance(decision, Reject):
            # Debug only: the access log line (verdict, reason, policy) is the one
            # record of a deny.
            log.debug("refused plaintext %s -> %s: %s", src, dst, decision.reason)
            refuse(ctx, sock, info, decision.reason, decision.flags, policy=decision.policy)
            return None

        async def relay(conn: LiveConnection) -> RelayResult:
            try:
                upstream = await connect_to_pod(ctx, dst, src.ip)
            except BaseException:
                reset(sock)
                raise
            return await relay_sockets(sock, upstream, conn.track_bytes())

        return proxied(ctx, info, relay, authz=decision.authz, policy=decision.policy)
