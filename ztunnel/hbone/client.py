"""The HBONE client side of one connection: dial, verify, open CONNECT streams.

:func:`connect_hbone` turns a connected socket into a verified HTTP/2
connection (TLS 1.3, ALPN h2, the server's single URI SAN equal to the expected
identity). :meth:`HboneClientConnection.open_stream` sends one CONNECT and
returns the :class:`HboneStream` once the server answered 200; the caller then
runs :func:`~ztunnel.hbone.stream.relay`. Pooling lives in
:mod:`ztunnel.hbone.pool`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from datetime import datetime

from controller.api.spiffe import SpiffeId

from .config import HboneConfig
from .connect import format_authority, request_headers
from .endpoint import H2Endpoint, _fmt
from .errors import ConnectRefused, HboneConnectError, LocalProtocolError, StreamRefused
from .http2.connection import Role
from .http2.events import ResponseReceived
from .http2.frames import ErrorCode
from .stream import CloseReason, TunnelStream

__all__ = ["HboneClientConnection", "HboneStream", "connect_hbone"]


class HboneStream(TunnelStream):
    """An outbound tunnel; :attr:`status` is the server's answer to the CONNECT."""

    def __init__(self, endpoint: HboneClientConnection, stream_id: int, authority: str) -> None:
        super().__init__(endpoint, stream_id)
        self.authority = authority
        self.status: int | None = None
        self._refused = False
        # Until the CONNECT is answered; dropped then (one object fewer per live stream).
        self._response: asyncio.Future[int | None] | None = endpoint.loop.create_future()

    def _on_response(self, status: int) -> None:
        self.status = status
        if self._response is not None and not self._response.done():
            self._response.set_result(status)

    def _on_reset(self, code: int, remote: bool) -> None:
        self._refused = remote and code == ErrorCode.REFUSED_STREAM and self.status is None
        super()._on_reset(code, remote)

    def _finish(self, reason: CloseReason, detail: str) -> None:
        super()._finish(reason, detail)
        if self._response is not None and not self._response.done():
            self._response.set_result(None)


class HboneClientConnection(H2Endpoint):
    """One pooled HBONE connection from a source identity to a destination."""

    def __init__(
        self,
        config: HboneConfig,
        trust_domain: str,
        expected_identity: SpiffeId,
        cert_not_after: datetime | None = None,
        on_closed: Callable[[HboneClientConnection], None] | None = None,
    ) -> None:
        super().__init__(
            Role.CLIENT, config, trust_domain, expected_identity, config.pool_idle_timeout
        )
        self.cert_not_after = cert_not_after
        self.reserved = 0  # streams promised to callers that have not sent HEADERS yet
        self._closed_cb = on_closed

    def _on_response(self, event: ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if isinstance(stream, HboneStream):
            stream._on_response(event.status)

    def _on_closed(self) -> None:
        if self._closed_cb is not None:
            self._closed_cb(self)

    @property
    def usable(self) -> bool:
        t = self.transport
        return t is not None and not t.is_closing() and self.conn.can_open_stream

    async def open_stream(
        self,
        target: tuple[str, int],
        forwarded_for: tuple[str, int] | None = None,
        *,
        traceparent: str | None = None,
        baggage: str | None = None,
    ) -> HboneStream:
        """CONNECT to ``target`` (pod ip, port); returns once the server answered 200.

        Raises ConnectRefused (non-2xx), StreamRefused (not processed: retry on
        another connection) or HboneConnectError (timeout, connection lost).
        """
        authority = format_authority(*target)
        peer = _fmt(self.peer_addr)
        headers = request_headers(
            target[0], target[1], forwarded_for, traceparent=traceparent, baggage=baggage
        )
        try:
            sid = self.conn.send_request(headers)
        except LocalProtocolError as exc:
            detail = self.close_detail or exc.message
            if self.conn.closed:
                raise HboneConnectError(
                    f"the HBONE connection to {peer} was closed: {detail}",
                    hint="a server that refused our certificate says so in its GOAWAY",
                ) from None
            raise StreamRefused(f"cannot open a stream to {peer}: {detail}") from None
        stream = HboneStream(self, sid, authority)
        self.register(stream)
        self.flush()
        timeout = self.config.stream_open_timeout
        response = stream._response
        assert response is not None
        try:
            # No shield: a cancelled wait cancels only this stream's own future,
            # which nothing else awaits.
            async with asyncio.timeout(timeout):
                status = await response
        except TimeoutError:
            stream.close(CloseReason.CLOSED, "no answer to CONNECT")
            raise HboneConnectError(
                f"CONNECT {authority} via {peer} got no answer within {timeout:g}s",
                hint="the destination node may be overloaded or the pod slow to accept",
            ) from None
        except asyncio.CancelledError:
            stream.close(CloseReason.CANCELLED, "cancelled while waiting for the CONNECT answer")
            raise
        stream._response = None
        if status is None:
            result = stream.result
            detail = result.detail if result else "stream ended"
            if stream._refused:
                raise StreamRefused(f"CONNECT {authority} via {peer} was not processed: {detail}")
            raise HboneConnectError(
                f"CONNECT {authority} via {peer} failed before an answer: {detail}",
                hint="see the destination ztunnel's log; a certificate the server refused "
                "shows up here as a closed connection",
            )
        if not 200 <= status < 300:
            stream._abort(CloseReason.REJECTED, f"status {status}", reset=True)
            raise ConnectRefused(status, authority)
        return stream


async def connect_hbone(
    sock: socket.socket,
    ssl_context: ssl.SSLContext,
    *,
    expected_identity: SpiffeId,
    trust_domain: str,
    config: HboneConfig | None = None,
    cert_not_after: datetime | None = None,
    on_closed: Callable[[HboneClientConnection], None] | None = None,
) -> HboneClientConnection:
    """TLS + HTTP/2 over a connected socket; raises HboneConnectError if the
    handshake fails or the server is not ``expected_identity``."""
    cfg = config or HboneConfig()
    loop = asyncio.get_running_loop()
    try:
        peer = sock.getpeername()
    except OSError as exc:
        sock.close()
        raise HboneConnectError(f"the HBONE socket is not connected: {exc}") from exc
    where = _fmt((str(peer[0]), int(peer[1])))
    sock.setblocking(False)
    made: list[HboneClientConnection] = []

    def factory() -> HboneClientConnection:
        made.append(
            HboneClientConnection(cfg, trust_domain, expected_identity, cert_not_after, on_closed)
        )
        return made[0]

    try:
        await loop.create_connection(
            factory,
            sock=sock,
            ssl=ssl_context,
            server_hostname="",  # no SNI: the server picks its certificate by destination IP
            ssl_handshake_timeout=cfg.handshake_timeout,
        )
    except ssl.SSLError as exc:
        raise HboneConnectError(
            f"TLS handshake with {where} failed: {exc}",
            hint=f"the destination must present an SVID for {expected_identity} issued by "
            "this mesh's CA",
        ) from exc
    except (TimeoutError, OSError) as exc:
        raise HboneConnectError(
            f"TLS handshake with {where} failed: {exc or type(exc).__name__}",
            hint="check that the destination node's ztunnel is up and listening on 15008",
        ) from exc
    endpoint = made[0]
    error = await endpoint.ready
    if error is not None:
        raise HboneConnectError(f"HBONE connection to {where} refused: {error}") from error
    return endpoint
