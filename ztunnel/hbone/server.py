"""The HBONE server: terminate mTLS on :15008 and serve CONNECT tunnels to local pods.

The proxy's listener accepts a TCP connection and calls
:meth:`HboneServer.serve_connection`. The TLS handshake starts only then,
because the certificate to present depends on which pod the client dialled:
``getsockname()`` of the accepted socket (the original destination, thanks to
the transparent listener) is passed to ``select_cert``.

For every well-formed CONNECT the server runs ``handler(stream)`` in its own
task, with an :class:`InboundStream` whose :attr:`~InboundStream.request` says
who (verified SPIFFE ID) wants which pod port. The handler decides::

    async def handler(stream: InboundStream) -> None:
        if not policy_allows(stream.request):
            stream.reject(401, "denied by policy")
            return
        try:
            sock = await dial_pod(stream.request)     # IP_TRANSPARENT, SO_MARK...
        except OSError:
            stream.reject(503, "pod unreachable")
            return
        result = await relay(stream, sock)            # sends the 200 first
        access_log(stream.request, result)

A handler may instead start the relay with :func:`~ztunnel.hbone.stream.start_relay`
and return at once: the stream then lives on transport callbacks alone, with no
task or coroutine frame per held connection (the ztunnel's inbound path does
this), and ends as the relay does or when :meth:`TunnelStream.close` is called.

A handler that returns without answering gets a 503 sent for it (fail closed),
one that raises as well; one that answered 200 and returns without a relay
started has its stream closed. Requests the HBONE rules refuse (authority IP not the
connection's destination unless the server was built without that rule, not
CONNECT, bad ``forwarded``) are answered 400 without calling the handler. Cancelling the handler task resets the stream.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from controller.api.model import TrustBundle
from ztunnel.tls import CredentialError, TlsContextCache, WorkloadCredential

from .config import HboneConfig
from .connect import STATUS_BAD_REQUEST, ConnectRequest, Rejection, decide_request, normalize_ip
from .endpoint import H2Endpoint, close_selected, drain, wait_all
from .errors import LocalProtocolError
from .heap import HeapTrimmer
from .http2.connection import Role
from .http2.events import RequestReceived
from .http2.frames import ErrorCode
from .http2.streams import State
from .stream import CloseReason, RelayResult, TunnelStream

__all__ = ["HboneServer", "InboundHandler", "InboundStream", "SelectCert"]

log = logging.getLogger(__name__)

SelectCert = Callable[[str], WorkloadCredential | None]
# An async handler, or a plain one that decides at once and returns what is left
# to await (None: nothing), which saves a coroutine frame per live stream.
InboundHandler = Callable[["InboundStream"], Awaitable[None] | None]


class InboundStream(TunnelStream):
    """A CONNECT received by this node, waiting for the handler's decision."""

    def __init__(self, endpoint: H2Endpoint, request: ConnectRequest) -> None:
        super().__init__(endpoint, request.stream_id)
        self.request = request
        self.status: int | None = None  # the status answered, once answered

    def accept(self) -> None:
        """Answer 200: the tunnel is open. :func:`relay` calls this itself."""
        if self.status is not None:
            return
        if self.is_closed:
            raise LocalProtocolError(f"stream {self.stream_id} already ended")
        self._ep.conn.send_response(self.stream_id, 200)
        self.status = 200
        self._ep.flush()

    def reject(self, status: int, reason: str = "") -> RelayResult:
        """Answer ``status`` (401 denied, 503 unreachable...) and end the stream."""
        if not 300 <= status <= 599:
            raise LocalProtocolError(f"reject() needs an error status, not {status}")
        if self.status is not None:
            raise LocalProtocolError(f"stream {self.stream_id} was already answered")
        self.status = status
        conn = self._ep.conn
        if not self.is_closed and not conn.closed:
            conn.send_response(self.stream_id, status, end_stream=True)
            # The client may still be sending: stop it without an error (RFC 9113 8.1).
            conn.reset_stream(self.stream_id, ErrorCode.NO_ERROR)
            self._ep.flush()
        self._finish(CloseReason.REJECTED, reason or f"status {status}")
        assert self.result is not None
        return self.result

    def _prepare_relay(self) -> None:
        self.accept()


class _ServerEndpoint(H2Endpoint):
    def __init__(self, server: HboneServer, l3_dst: str, trust_domain: str) -> None:
        super().__init__(
            Role.SERVER, server.config, trust_domain, None, server.config.server_idle_timeout
        )
        self._server = server
        self.l3_dst = l3_dst

    def _on_request(self, event: RequestReceived) -> None:
        assert self.peer_identity is not None
        if self.conn.stream_state(event.stream_id) is State.CLOSED:
            # A later frame of the same read already ended the stream (the
            # client's RST_STREAM, or a stream error we answered): nothing to answer.
            return
        decision: ConnectRequest | Rejection = decide_request(
            event.headers,
            stream_id=event.stream_id,
            peer_identity=self.peer_identity,
            l3_dst=self.l3_dst,
            peer_addr=self.peer_addr,
            require_authority_is_destination=self._server.require_authority_is_destination,
        )
        if isinstance(decision, ConnectRequest) and event.end_stream:
            decision = Rejection(STATUS_BAD_REQUEST, "CONNECT with END_STREAM carries no tunnel")
        if isinstance(decision, Rejection):
            log.info(
                "hbone CONNECT from %s (%s) refused with %d: %s",
                self.peer_identity,
                self.peer_addr[0],
                decision.status,
                decision.reason,
            )
            self.conn.send_response(event.stream_id, decision.status, end_stream=True)
            self.conn.reset_stream(event.stream_id, ErrorCode.NO_ERROR)
            return
        stream = InboundStream(self, decision)
        self.register(stream)
        self._server._spawn(stream)

    def _on_closed(self) -> None:
        self._server._endpoints.discard(self)
        self._server._heap.connection_closed(self.loop)


class HboneServer:
    """Serves HBONE connections; holds every live one for policy re-checks and shutdown.

    ``select_cert(dst_ip)`` returns the certificate of the local workload that
    owns ``dst_ip`` (None: not ours, the connection is dropped); ``bundle()``
    returns the current trust bundle; ``handler`` decides each CONNECT.

    ``require_authority_is_destination`` (default True) is the ztunnel's
    security rule: a CONNECT's authority IP must be the address the client
    dialled, so a peer cannot reach one pod through another pod's certificate.
    A waypoint, dialled at its own address on behalf of many destinations,
    passes False: any well-formed ``ip:port`` authority reaches ``handler``,
    which must then refuse the destinations it does not serve.
    """

    def __init__(
        self,
        select_cert: SelectCert,
        bundle: Callable[[], TrustBundle],
        handler: InboundHandler,
        *,
        config: HboneConfig | None = None,
        contexts: TlsContextCache | None = None,
        require_authority_is_destination: bool = True,
    ) -> None:
        self.config = config or HboneConfig()
        self.require_authority_is_destination = require_authority_is_destination
        self._select_cert = select_cert
        self._bundle = bundle
        self._handler = handler
        self._contexts = contexts or TlsContextCache()
        self._endpoints: set[_ServerEndpoint] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._shutting_down = False
        cfg = self.config
        self._heap = HeapTrimmer(cfg.heap_trim_after_closes, cfg.heap_trim_delay)

    async def serve_connection(self, sock: socket.socket) -> None:
        """Serve one accepted connection until it closes. Never raises for peer errors."""
        if self._shutting_down:
            sock.close()
            return
        try:
            dst_ip = normalize_ip(sock.getsockname()[0])
            peer = sock.getpeername()
        except (OSError, ValueError) as exc:
            log.info("hbone: dropping a connection whose addresses are unknown: %s", exc)
            sock.close()
            return
        cred = self._select_cert(dst_ip)
        if cred is None:
            log.info("hbone: %s dialled %s, which is no local workload; closing", peer[0], dst_ip)
            sock.close()
            return
        bundle = self._bundle()
        try:
            ctx = self._contexts.server(cred, bundle)
        except CredentialError as exc:
            log.warning("hbone: cannot serve %s: %s", dst_ip, exc)
            sock.close()
            return
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        made: list[_ServerEndpoint] = []

        def factory() -> _ServerEndpoint:
            made.append(_ServerEndpoint(self, dst_ip, bundle.trust_domain))
            return made[0]

        try:
            # The endpoint comes from the factory: uvloop returns its TLS wrapper
            # protocol from connect_accepted_socket, not ours.
            await loop.connect_accepted_socket(
                factory,
                sock,
                ssl=ctx,
                ssl_handshake_timeout=self.config.handshake_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.info("hbone: TLS handshake from %s to %s failed: %s", peer[0], dst_ip, exc)
            return
        endpoint = made[0]
        if endpoint.transport is None or endpoint.closed.done():
            return
        self._endpoints.add(endpoint)
        if self._shutting_down:  # the handshake finished after shutdown() began
            endpoint.close_gracefully("shutting down")
        await endpoint.closed

    def _spawn(self, stream: InboundStream) -> None:
        task = asyncio.get_running_loop().create_task(self._run_handler(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, stream: InboundStream) -> None:
        try:
            pending = self._handler(stream)
            if pending is not None:
                await pending
        except asyncio.CancelledError:
            stream.close(CloseReason.CANCELLED, "the inbound handler was cancelled")
            raise
        except Exception:
            log.exception("hbone: inbound handler failed for %s", stream.request.authority)
            if stream.status is None:
                stream.reject(503, "the inbound handler failed")
            else:
                stream.close(CloseReason.LOCAL_RESET, "the inbound handler failed")
            return
        if stream.status is None:
            stream.reject(503, "the inbound handler returned without answering")
        elif not stream.is_closed and not stream.relaying:
            stream.close(CloseReason.CLOSED, "the inbound handler returned")

    # ------------------------------------------------------- operations

    @property
    def connection_count(self) -> int:
        return len(self._endpoints)

    @property
    def handlers_running(self) -> int:
        """Handler tasks still running (deciding, dialling, or relaying with a task)."""
        return len(self._tasks)

    def streams(self) -> list[InboundStream]:
        """Every live inbound stream."""
        return [
            s for ep in self._endpoints for s in ep.streams.values() if isinstance(s, InboundStream)
        ]

    def close_streams(
        self,
        predicate: Callable[[InboundStream], bool],
        reason: CloseReason = CloseReason.CLOSED,
        detail: str = "no longer allowed by policy",
    ) -> int:
        """Reset the live streams ``predicate`` selects; returns how many."""
        return close_selected(self.streams(), predicate, reason, detail)

    async def shutdown(self, grace: float | None = None) -> None:
        """GOAWAY to every connection, let streams drain for ``grace`` seconds, then
        reset what is left and close."""
        self._shutting_down = True
        grace = self.config.shutdown_grace if grace is None else grace
        await drain(list(self._endpoints), grace)
        tasks = list(self._tasks)
        await wait_all(tasks, 1.0)
        for task in tasks:
            task.cancel()
        await wait_all(tasks, 1.0)
        self._heap.cancel()
