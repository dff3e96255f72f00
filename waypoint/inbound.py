"""The waypoint's HBONE listener: mTLS CONNECT tunnels addressed to its destinations.

The ztunnel's :class:`~ztunnel.hbone.HboneServer` insists that a CONNECT's
authority IP equal the address the client dialled, because a ztunnel serves
pods at their own addresses. A waypoint is dialled at its own address and
carries traffic for many destinations: the source ztunnel puts the original
destination (a Service VIP or a workload IP, with the port) in the authority.
So this server is the ztunnel's one with that single rule replaced: any
well-formed ``ip:port`` authority is accepted for evaluation, and the handler
refuses the destinations this waypoint does not serve. Everything else (TLS,
SPIFFE verification of the client, HTTP/2 limits, ``forwarded``, shutdown)
is the ztunnel library's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl

from ztunnel.hbone import InboundStream
from ztunnel.hbone.connect import (
    STATUS_BAD_REQUEST,
    BadAuthority,
    ConnectRequest,
    Rejection,
    decide_request,
    normalize_ip,
    parse_authority,
)
from ztunnel.hbone.http2.events import RequestReceived
from ztunnel.hbone.http2.frames import ErrorCode
from ztunnel.hbone.http2.streams import State
from ztunnel.hbone.server import HboneServer, _ServerEndpoint
from ztunnel.tls import CredentialError

__all__ = ["WaypointHboneServer"]

log = logging.getLogger("veil.waypoint.inbound")


class _WaypointEndpoint(_ServerEndpoint):
    def _on_request(self, event: RequestReceived) -> None:
        assert self.peer_identity is not None
        if self.conn.stream_state(event.stream_id) is State.CLOSED:
            return
        authority = dict(event.headers).get(":authority", "")
        try:
            host, _port = parse_authority(authority)
        except BadAuthority as exc:
            decision: ConnectRequest | Rejection = Rejection(
                STATUS_BAD_REQUEST, f"bad :authority: {exc}"
            )
        else:
            # The destination is named by the authority, not by our address.
            decision = decide_request(
                event.headers,
                stream_id=event.stream_id,
                peer_identity=self.peer_identity,
                l3_dst=host,
                peer_addr=self.peer_addr,
            )
            if isinstance(decision, ConnectRequest):
                decision = dataclasses.replace(decision, l3_dst=self.l3_dst)
        if isinstance(decision, ConnectRequest) and event.end_stream:
            decision = Rejection(STATUS_BAD_REQUEST, "CONNECT with END_STREAM carries no tunnel")
        if isinstance(decision, Rejection):
            log.info(
                "waypoint CONNECT from %s refused with %d: %s",
                self.peer_identity,
                decision.status,
                decision.reason,
            )
            self.conn.send_response(event.stream_id, decision.status, end_stream=True)
            self.conn.reset_stream(event.stream_id, ErrorCode.NO_ERROR)
            return
        stream = InboundStream(self, decision)
        self.register(stream)
        self._server._spawn(stream)


class WaypointHboneServer(HboneServer):
    """:class:`HboneServer` whose connections accept any destination authority."""

    async def serve_connection(self, sock: socket.socket) -> None:
        if self._shutting_down:
            sock.close()
            return
        try:
            dst_ip = normalize_ip(sock.getsockname()[0])
            peer = sock.getpeername()
        except (OSError, ValueError) as exc:
            log.info("waypoint: dropping a connection whose addresses are unknown: %s", exc)
            sock.close()
            return
        cred = self._select_cert(dst_ip)
        if cred is None:
            log.info("waypoint: no certificate yet; closing the connection from %s", peer[0])
            sock.close()
            return
        bundle = self._bundle()
        try:
            ctx = self._contexts.server(cred, bundle)
        except CredentialError as exc:
            log.warning("waypoint: cannot serve TLS: %s", exc)
            sock.close()
            return
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        made: list[_WaypointEndpoint] = []

        def factory() -> _WaypointEndpoint:
            made.append(_WaypointEndpoint(self, dst_ip, bundle.trust_domain))
            return made[0]

        try:
            await loop.connect_accepted_socket(
                factory, sock, ssl=ctx, ssl_handshake_timeout=self.config.handshake_timeout
            )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.info("waypoint: TLS handshake from %s failed: %s", peer[0], exc)
            return
        endpoint = made[0]
        if endpoint.transport is None or endpoint.closed.done():
            return
        self._endpoints.add(endpoint)
        if self._shutting_down:
            endpoint.close_gracefully("shutting down")
        await endpoint.closed
