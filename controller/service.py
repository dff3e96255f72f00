"""Server-side gRPC adapters: protobuf in, model types to the backends, status out.

The controller's logic implements :class:`IdentityBackend` and
:class:`DiscoveryBackend` with plain Python types; this module registers them on
a ``grpc.aio`` server. Backends raise :class:`~controller.api.errors.ApiError`
with a gRPC status name, which is sent to the node with its message.

Node authentication on the mTLS listener: gRPC has already verified the client
chain against the trust bundle. The node name is read from the verified
certificate's single URI SAN (``spiffe://<td>/veil/node/<name>``), never from a
request field.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import grpc
from cryptography import x509

from controller.api import veil_pb2 as pb
from controller.api import veil_pb2_grpc as pb_grpc
from controller.api.errors import ApiError
from controller.api.model import JoinResult, ResourceType, WatchUpdate
from controller.api.spiffe import InvalidSpiffeId, SpiffeId, channel_principal
from controller.api.wire import watch_response_to_pb

__all__ = [
    "DiscoveryBackend",
    "IdentityBackend",
    "JoinResult",
    "Subscription",
    "add_services",
    "peer_node",
]

log = logging.getLogger("veil.controller.api")


class IdentityBackend(Protocol):
    async def join_node(self, token: str, csr_pem: bytes, node: str) -> JoinResult: ...

    async def create_certificate(
        self, node: str, csr_pem: bytes, identity: str, ttl_seconds: int
    ) -> tuple[bytes, ...]: ...

    def trust_domain(self) -> str: ...


class Subscription(Protocol):
    async def next(self) -> WatchUpdate:
        """The next coalesced update; the first is the snapshot or resume delta."""
        ...

    def close(self) -> None: ...


class DiscoveryBackend(Protocol):
    def subscribe(
        self, node: str, types: frozenset[ResourceType], epoch: str, version: int
    ) -> Subscription: ...


_CODES = {c.name: c for c in grpc.StatusCode}


async def _abort(context: grpc.aio.ServicerContext, err: ApiError) -> None:
    code = _CODES.get(err.code, grpc.StatusCode.INTERNAL)
    await context.abort(code, str(err))


def peer_node(context: grpc.aio.ServicerContext, trust_domain: str) -> str:
    """The node name from the caller's verified client certificate.

    Raises ApiError(UNAUTHENTICATED) when the call did not come over mTLS with a
    Veil node certificate of this trust domain.
    """
    auth: dict[str, Any] = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise ApiError(
            "UNAUTHENTICATED",
            "this RPC needs mutual TLS with a node certificate",
            hint="join the node first (veil node join) and call the mTLS listener (:15012)",
        )
    cert = x509.load_pem_x509_certificate(pems[0])
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise ApiError(
            "UNAUTHENTICATED",
            f"client certificate has {len(uris)} URI SANs; exactly one is required",
        )
    try:
        sid = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as e:
        raise ApiError(
            "UNAUTHENTICATED", f"client certificate SAN is not a SPIFFE ID: {e}"
        ) from None
    # A waypoint pod's channel identity (/veil/waypoint/...) is a principal too;
    # what it may obtain is decided by controller.identity.authorize_identity.
    principal = channel_principal(sid) if sid.trust_domain == trust_domain else None
    if principal is None:
        raise ApiError(
            "PERMISSION_DENIED",
            f"client certificate identity {sid} is not a node identity of trust domain {trust_domain}",
        )
    return principal


class _IdentityServicer(pb_grpc.IdentityServicer):
    def __init__(self, backend: IdentityBackend) -> None:
        self._backend = backend

    async def JoinNode(
        self, request: pb.JoinNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinNodeResponse:
        try:
            res = await self._backend.join_node(request.token, bytes(request.csr), request.node)
        except ApiError as e:
            log.warning("join refused: %s", e)
            await _abort(context, e)
            raise AssertionError("unreachable") from None
        return pb.JoinNodeResponse(
            cert_chain=res.cert_chain,
            trust_bundle=res.trust_bundle,
            node=res.node,
            trust_domain=res.trust_domain,
            controller_address=res.controller_address,
        )

    async def CreateCertificate(
        self, request: pb.CreateCertificateRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCertificateResponse:
        try:
            node = peer_node(context, self._backend.trust_domain())
            chain = await self._backend.create_certificate(
                node, bytes(request.csr), request.identity, int(request.ttl_seconds)
            )
        except ApiError as e:
            log.warning("certificate refused: %s", e)
            await _abort(context, e)
            raise AssertionError("unreachable") from None
        return pb.CreateCertificateResponse(cert_chain=chain)


class _DiscoveryServicer(pb_grpc.DiscoveryServicer):
    def __init__(self, backend: DiscoveryBackend, identity: IdentityBackend) -> None:
        self._backend = backend
        self._identity = identity

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        # Sent with context.write rather than yield: gRPC keeps a yielded
        # message alive until the next one, and the first message is a whole
        # registry snapshot, so every idle watcher would pin one in memory.
        try:
            node = peer_node(context, self._identity.trust_domain())
            types = frozenset(ResourceType(t) for t in request.types if t) or frozenset(
                ResourceType
            )
        except ApiError as e:
            await _abort(context, e)
            return
        except ValueError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "unknown resource type in WatchRequest.types"
            )
            return
        if request.node and request.node != node:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"WatchRequest.node {request.node!r} does not match the certificate's node {node!r}",
            )
            return
        sub = self._backend.subscribe(node, types, request.epoch, int(request.version))
        try:
            while True:
                try:
                    update = await sub.next()
                except ApiError as e:  # e.g. the hub is shutting down: UNAVAILABLE
                    await _abort(context, e)
                    return
                await context.write(watch_response_to_pb(update))
        finally:
            sub.close()


def add_services(
    server: grpc.aio.Server, identity: IdentityBackend, discovery: DiscoveryBackend
) -> None:
    """Registers Identity and Discovery on ``server`` (health is added by the caller)."""
    pb_grpc.add_IdentityServicer_to_server(_IdentityServicer(identity), server)  # type: ignore[no-untyped-call]
    pb_grpc.add_DiscoveryServicer_to_server(_DiscoveryServicer(discovery, identity), server)  # type: ignore[no-untyped-call]
