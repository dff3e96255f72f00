"""The inbound plaintext listener (15006): traffic from outside the mesh to a
local enrolled pod.

Such a client has no verified identity. The destination's effective
PeerAuthentication mode decides first: STRICT refuses (RST, logged, counted),
PERMISSIVE lets the connection be authorized with no principal, so a policy
that names principals or namespaces cannot match it (and ``notPrincipals:
["*"]`` does, which is Istio's way to deny unauthenticated callers). Allowed
connections are relayed to the pod from the client's own address.
"""

from __future__ import annotations

import logging
import socket

from controller.api.model import Workload
from controller.api.spiffe import InvalidSpiffeId, SpiffeId
from ztunnel.policy import Connection, authorize, plaintext_verdict

from .connections import (
    FLAG_NO_ROUTE,
    FLAG_POLICY_DENIED,
    ConnectionInfo,
    Direction,
    LiveConnection,
)
from .context import ProxyContext, proxied, refuse
from .relay import RelayResult, relay_sockets
from .sockets import Address, connect_upstream, local_address, peer_address, reset

__all__ = ["connect_to_pod", "handle_plaintext"]

log = logging.getLogger("veil.ztunnel.proxy")


def _identity(w: Workload | None) -> SpiffeId | None:
    if w is None:
        return None
    try:
        return w.identity
    except InvalidSpiffeId:
        return None


async def connect_to_pod(ctx: ProxyContext, dst: Address, client_ip: str) -> socket.socket:
    """A marked connection to a local pod, from ``client_ip`` when the context
    is transparent (the pod then sees the real client address)."""
    return await connect_upstream(
        dst,
        mark=ctx.mark,
        bind_ip=client_ip if ctx.transparent else None,
        transparent=ctx.transparent,
        timeout=ctx.connect_timeout,
    )


async def handle_plaintext(ctx: ProxyContext, sock: socket.socket) -> None:
    """Handles one connection accepted on 15006; owns ``sock``."""
    try:
        src = peer_address(sock)
        dst = local_address(sock)
    except OSError:
        sock.close()  # the client is already gone
        return
    snap = ctx.store.current
    dest = snap.workload_by_ip(dst.ip)
    info = ConnectionInfo(
        direction=Direction.INBOUND_PLAINTEXT,
        src=src,
        dst=dst,
        route="inbound_plaintext",
        src_workload=snap.workload_by_ip(src.ip),
        dst_workload=dest,
        dst_identity=_identity(dest),
    )
    if dest is None or dest.node != snap.node or not dest.enrolled:
        refuse(ctx, sock, info, f"{dst.ip} is not an enrolled workload of this node", FLAG_NO_ROUTE)
        return
    mode = plaintext_verdict(snap, dest)
    if not mode.allowed:
        log.info("refused plaintext %s -> %s: %s", src, dst, mode.reason)
        refuse(ctx, sock, info, mode.reason, FLAG_POLICY_DENIED)
        return
    authz = Connection(src_ip=src.ip, dst_ip=dst.ip, dst_port=dst.port, src_identity=None)
    verdict = authorize(authz, snap, dest)
    if not verdict.allowed:
        log.info("refused plaintext %s -> %s: %s", src, dst, verdict.reason)
        refuse(ctx, sock, info, verdict.reason, FLAG_POLICY_DENIED, policy=verdict.policy)
        return

    if dst.port in ctx.own_ports:
        # A pod port equal to one of ours would make the relay dial this
        # listener again (and again): refuse instead of looping.
        refuse(ctx, sock, info, f"port {dst.port} is reserved for the ztunnel", FLAG_NO_ROUTE)
        return

    async def relay(conn: LiveConnection) -> RelayResult:
        try:
            upstream = await connect_to_pod(ctx, dst, src.ip)
        except BaseException:
            reset(sock)
            raise
        return await relay_sockets(sock, upstream, conn.track_bytes())

    await proxied(ctx, info, relay, authz=authz, policy=verdict.policy)
