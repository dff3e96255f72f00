"""One request through the waypoint, whatever HTTP version carried it.

:class:`RequestProxy` resolves the destination (per request, so a policy
change applies to live keep-alive connections), makes sure the JWKS it needs
were fetched, takes the pure :func:`~waypoint.decide.decide`, then either
answers (400/401/403/503) or picks an endpoint and relays the exchange
upstream. Every request ends in one access-log line (JSON, with the deciding
policy and reason) and one observation in the request metrics. The HTTP
front ends (:mod:`.http1`, :mod:`.http2`) hand it the parsed head, the
streaming body (:class:`~waypoint.body.RequestBody`, read only once the
request is allowed) and
a :class:`ResponseSink` to answer through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .balance import Balancer
from .body import RequestBody
from .decide import Forward, PeerFacts, Respond, decide
from .jwks import JwksCache
from .metrics import RequestLabels, RequestMetrics
from .switched import relay_raw
from .upstream import Upstream, UpstreamError, UpstreamResponse
from .upstream_h2 import H2Upstream, H2UpstreamResponse
from .view import Destination, WaypointView

__all__ = ["HOP_BY_HOP", "RequestProxy", "ResponseSink", "TunnelContext", "join_headers"]

access_log = logging.getLogger("veil.waypoint.access")
log = logging.getLogger("veil.waypoint")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"content-length",
        b"host",
    }
)
Headers = Sequence[tuple[bytes, bytes]]


class ResponseSink(Protocol):
    async def start(self, status: int, headers: Headers) -> None: ...
    async def data(self, chunk: bytes) -> None: ...
    async def end(self, trailers: Headers = ()) -> None: ...

    def upgrade_protocol(self) -> bytes | None:
        """The protocol the request asks to switch to (HTTP/1.1 Upgrade), if any."""
        ...

    async def switch(
        self, headers: Headers
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """Answers 101 with ``headers`` and hands over the client's raw streams
        and what it sent after its request."""
        ...


@dataclass(frozen=True, slots=True)
class TunnelContext:
    """What the HBONE tunnel says about every request it carries."""

    dst_ip: str
    dst_port: int
    peer: PeerFacts
    source_workload: str  # the source workload's name, "unknown" when not known
    forwarded_for: tuple[str, int] | None


def join_headers(headers: Headers) -> dict[str, str]:
    """Lower-case name -> value; repeated headers joined with ``,`` (RFC 9110)."""
    out: dict[str, str] = {}
    for name, value in headers:
        n = name.decode("latin-1").lower()
        v = value.decode("latin-1")
        out[n] = f"{out[n]},{v}" if n in out else v
    return out


def _is_grpc(headers: Headers) -> bool:
    """gRPC (any ``application/grpc*`` content type) works only over HTTP/2, so
    it leaves the waypoint as HTTP/2 whatever the port says."""
    return any(n == b"content-type" and v[:16].lower() == b"application/grpc" for n, v in headers)


def _upstream_headers(
    headers: Headers, host: str, strip: tuple[str, ...]
) -> list[tuple[bytes, bytes]]:
    """The request's end-to-end headers for upstream; each upstream adds the
    body's framing itself (HTTP/1.1 length or chunked, HTTP/2 DATA)."""
    listed = {
        t.strip().lower().encode()
        for name, value in headers
        if name.lower() == b"connection"
        for t in value.decode("latin-1").split(",")
    }
    drop = HOP_BY_HOP | listed | {s.encode() for s in strip}
    out = [(b"host", host.encode("latin-1"))]
    out += [(n, v) for n, v in headers if n.lower() not in drop]
    if any(n == b"te" and v.strip().lower() == b"trailers" for n, v in headers):
        out.append((b"te", b"trailers"))  # gRPC asks for trailers; HTTP/2 allows only this TE
    return out


def _response_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    listed = {
        t.strip().lower().encode()
        for name, value in headers
        if name.lower() == b"connection"
        for t in value.decode("latin-1").split(",")
    }
    drop = (HOP_BY_HOP - {b"content-length"}) | listed
    return [(n, v) for n, v in headers if n.lower() not in drop]


class RequestProxy:
    def __init__(
        self,
        view: Callable[[], WaypointView],
        upstream: Upstream,
        metrics: RequestMetrics,
        jwks: JwksCache,
        *,
        max_body: int = 0,
    ) -> None:
        self._view = view
        self.upstream = upstream
        self.upstream_h2 = H2Upstream(upstream)
        self.metrics = metrics
        self.jwks = jwks
        self.balancer = Balancer()
        self.max_body = max_body
        self.served = 0

    async def serve(
        self,
        ctx: TunnelContext,
        method: str,
        target: str,
        host: str,
        headers: Headers,
        body: RequestBody,
        protocol: str,
        sink: ResponseSink,
    ) -> None:
        started = time.monotonic()
        view = self._view()
        dest = view.resolve(ctx.dst_ip, ctx.dst_port)
        record = _Record(method, target, host, protocol, ctx, dest)
        try:
            await self._serve(record, dest, headers, body, sink)
        except BaseException as e:
            # The client or the upstream went away mid-response: still one
            # access-log line and one observation, saying so.
            record.reason = f"{record.reason}; aborted: {str(e) or type(e).__name__}".lstrip("; ")
            raise
        finally:
            self.served += 1
            self._finish(record, view, (time.monotonic() - started) * 1000.0)

    async def _serve(
        self,
        record: _Record,
        dest: Destination | None,
        headers: Headers,
        body: RequestBody,
        sink: ResponseSink,
    ) -> None:
        ctx = record.ctx
        method, target, host = record.method, record.target, record.host
        if dest is None:
            await self._answer(
                sink,
                record,
                Respond(
                    503, b"no healthy upstream\n", "destination no longer served by this waypoint"
                ),
            )
        else:
            uris = dest.authn.jwks_uris
            if uris:
                await self.jwks.ensure(uris)
            hmap = join_headers(headers)
            decision = decide(dest, method, target, host, hmap, ctx.peer, self.jwks.keys)
            record.policy, record.reason = decision.policy, decision.reason
            record.request_principal = decision.request_principal
            if isinstance(decision, Respond):
                await self._answer(sink, record, decision)
            else:
                await self._forward(sink, record, dest, decision, headers, body)

    async def _answer(self, sink: ResponseSink, record: _Record, r: Respond) -> None:
        record.status, record.reason = r.status, r.reason
        if r.policy is not None:
            record.policy = r.policy
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(r.body)).encode()),
            *((k.encode(), v.encode()) for k, v in r.headers),
        ]
        await sink.start(r.status, headers)
        if record.method != "HEAD":
            await sink.data(r.body)
            record.bytes_sent = len(r.body)
        await sink.end()

    async def _forward(
        self,
        sink: ResponseSink,
        record: _Record,
        dest: Destination,
        decision: Forward,
        headers: Headers,
        body: RequestBody,
    ) -> None:
        endpoint = self.balancer.pick(dest.endpoints)
        record.endpoint = f"{endpoint.workload} {endpoint.ip}:{endpoint.port}"
        record.destination_workload = endpoint.workload
        record.destination_principal = str(endpoint.identity)
        try:
            up_headers = _upstream_headers(headers, record.host, decision.strip)
            if record.ctx.peer.ip:
                up_headers.append((b"x-forwarded-for", record.ctx.peer.ip.encode()))
            resp: UpstreamResponse | H2UpstreamResponse
            upgrade = sink.upgrade_protocol()
            try:
                # No ``forwarded`` on the upstream CONNECT: the destination
                # ztunnel trusts it only for an address of the peer's own identity
                # (the waypoint's), so the client travels in x-forwarded-for.
                if dest.http2 or (record.protocol == "http/2" and _is_grpc(headers)):
                    resp = await self.upstream_h2.request(
                        endpoint, record.method, decision.target, record.host, up_headers, body
                    )
                else:
                    resp = await self.upstream.request(
                        endpoint,
                        record.method,
                        decision.target,
                        up_headers,
                        body,
                        None,
                        upgrade=upgrade,
                    )
            except UpstreamError as e:
                await self._answer(
                    sink,
                    record,
                    Respond(e.status, b"upstream connect error\n", e.detail, decision.policy),
                )
                return
            record.status = resp.status
            if resp.status == 101 and upgrade is not None and isinstance(resp, UpstreamResponse):
                await self._switch(sink, record, resp)
                return
            try:
                await sink.start(resp.status, _response_headers(resp.headers))
                async for chunk in resp.chunks():
                    await sink.data(chunk)
                await sink.end(resp.trailers)
            except BaseException:
                resp.abort()
                raise
            finally:
                record.bytes_sent = resp.bytes
        finally:
            self.balancer.release(endpoint)

    async def _switch(self, sink: ResponseSink, record: _Record, resp: UpstreamResponse) -> None:
        """The upstream switched protocols (websocket): relay raw bytes both
        ways until both directions ended; the request was authorized on its head."""
        up_reader, up_writer, up_tail = resp.switched()
        switched = next((v for n, v in resp.headers if n == b"upgrade"), b"")
        headers = [
            *_response_headers(resp.headers),
            (b"connection", b"upgrade"),
            (b"upgrade", switched),
        ]
        try:
            reader, writer, tail = await sink.switch(headers)
            record.bytes_sent = await relay_raw(
                (reader, writer, tail), (up_reader, up_writer, up_tail)
            )
        finally:
            up_writer.close()

    def _finish(self, record: _Record, view: WaypointView, duration_ms: float) -> None:
        dest = record.dest
        service = (
            f"{dest.name}.{dest.namespace}"
            if dest is not None and dest.kind == "service"
            else "unknown"
        )
        peer = record.ctx.peer
        self.metrics.record(
            RequestLabels(
                request_protocol=record.protocol,
                response_code=record.status,
                source_workload=record.ctx.source_workload,
                source_workload_namespace=peer.namespace or "unknown",
                source_principal=peer.principal or "unknown",
                destination_service=service,
                destination_workload=record.destination_workload or "unknown",
                destination_principal=record.destination_principal or "unknown",
            ),
            duration_ms,
        )
        if not access_log.isEnabledFor(logging.INFO):
            return
        access_log.info(
            json.dumps(
                {
                    "method": record.method,
                    "path": record.target[:512],
                    "authority": record.host[:256],
                    "protocol": record.protocol,
                    "status": record.status,
                    "duration_ms": round(duration_ms, 3),
                    "bytes_sent": record.bytes_sent,
                    "source_principal": peer.principal,
                    "source_workload": record.ctx.source_workload,
                    "request_principal": record.request_principal,
                    "destination": dest.key
                    if dest is not None
                    else f"{record.ctx.dst_ip}:{record.ctx.dst_port}",
                    "endpoint": record.endpoint,
                    "policy": record.policy,
                    "reason": record.reason,
                    "waypoint": f"{view.namespace}/{view.name}",
                },
                sort_keys=True,
            )
        )


class _Record:
    """The access-log facts of one request, filled in as it goes."""

    __slots__ = (
        "bytes_sent",
        "ctx",
        "dest",
        "destination_principal",
        "destination_workload",
        "endpoint",
        "host",
        "method",
        "policy",
        "protocol",
        "reason",
        "request_principal",
        "status",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        host: str,
        protocol: str,
        ctx: TunnelContext,
        dest: Destination | None,
    ) -> None:
        self.method = method
        self.target = target
        self.host = host
        self.protocol = protocol
        self.ctx = ctx
        self.dest = dest
        self.status = 0
        self.bytes_sent = 0
        self.policy: str | None = None
        self.reason = ""
        self.request_principal: str | None = None
        self.endpoint: str | None = None
        self.destination_workload: str | None = None
        self.destination_principal: str | None = None
