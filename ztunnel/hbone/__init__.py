"""HBONE: TCP tunnelled over HTTP/2 CONNECT inside mutual TLS, as Istio's ztunnel speaks it.

Server side (the proxy's :15008 listener calls, per accepted socket)::

    server = HboneServer(select_cert, bundle, handler, config=HboneConfig())
    await server.serve_connection(sock)          # returns when the connection ends
    # handler(stream: InboundStream): stream.request is a ConnectRequest
    #   (peer_identity, host, port, l3_dst, peer_addr, forwarded_for, ...);
    #   stream.reject(401 | 503, reason)  or  await relay(stream, pod_socket)
    server.close_streams(predicate) / server.streams() / await server.shutdown(grace)

Client side (the proxy's :15001 listener)::

    pool = HboneClientPool(bundle, connect=marked_dialer, config=HboneConfig())
    stream = await pool.open_stream(src_cert, dst_ip, 15008, expected_identity,
                                    "10.0.2.5:8080", forwarded_for=(app_ip, app_port))
    result = await relay(stream, app_socket)     # RelayResult(bytes_up, bytes_down, reason)
    pool.close_streams(predicate) / pool.connections() / await pool.shutdown(grace)

Both kinds of stream have ``close(reason)``; cancelling the task awaiting
:func:`relay` resets both sides. Errors derive from :class:`HboneError`
(:class:`ConnectRefused` carries the server's status). The sans-IO protocol
core is :class:`H2Connection` (:mod:`ztunnel.hbone.http2`), usable with
bytes alone.
"""

from __future__ import annotations

from .client import HboneClientConnection, HboneStream, connect_hbone
from .config import H2Settings, HboneConfig
from .connect import ConnectRequest, Rejection, decide_request, parse_authority
from .errors import (
    ConnectRefused,
    HboneConnectError,
    HboneError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamClosedError,
    StreamRefused,
)
from .http2.connection import H2Connection, Role
from .pool import HboneClientPool, PoolConnectionInfo, PoolKey, SocketFactory, default_connect
from .server import HboneServer, InboundHandler, InboundStream, SelectCert
from .stream import CloseReason, RelayResult, TunnelStream, relay, start_relay

__all__ = [
    "CloseReason",
    "ConnectRefused",
    "ConnectRequest",
    "H2Connection",
    "H2Settings",
    "HboneClientConnection",
    "HboneClientPool",
    "HboneConfig",
    "HboneConnectError",
    "HboneError",
    "HboneServer",
    "HboneStream",
    "InboundHandler",
    "InboundStream",
    "LocalProtocolError",
    "PoolConnectionInfo",
    "PoolKey",
    "ProtocolError",
    "Rejection",
    "RelayResult",
    "RemoteProtocolError",
    "Role",
    "SelectCert",
    "SocketFactory",
    "StreamClosedError",
    "StreamRefused",
    "TunnelStream",
    "connect_hbone",
    "decide_request",
    "default_connect",
    "parse_authority",
    "relay",
    "start_relay",
]
