"""The node side of the controller API: the one client module.

Agents, ztunnels and the ``veil node`` CLI talk to the controller only through
this module. It converts protobuf into :mod:`controller.api.model` types and
gRPC failures into :class:`~controller.api.errors.ApiError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import TracebackType

import grpc

from . import veil_pb2 as pb
from . import veil_pb2_grpc as pb_grpc
from .errors import ApiError
from .model import JoinResult, ResourceType, WatchUpdate
from .wire import watch_update_from_pb

__all__ = ["CONTROLLER_SERVER_NAME", "ControllerClient", "join_node", "map_rpc_error"]

# The DNS SAN every controller serving certificate carries; nodes verify it.
CONTROLLER_SERVER_NAME = "veil-controller"

_CHANNEL_OPTIONS = [
    ("grpc.ssl_target_name_override", CONTROLLER_SERVER_NAME),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def map_rpc_error(err: grpc.aio.AioRpcError, what: str) -> ApiError:
    """Translates a gRPC failure into an ApiError that says what to do next."""
    code = err.code()
    details = err.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return ApiError(
            code.name,
            f"{what}: controller unreachable ({details})",
            hint="check the controller address and that it is running; the node retries with backoff",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(code.name, f"{what}: the controller did not answer in time", hint="retry")
    return ApiError(code.name, f"{what}: {details}")


async def join_node(
    address: str, root_pem: bytes, token: str, node: str, csr_pem: bytes, timeout: float = 10.0
) -> JoinResult:
    """Calls Identity.JoinNode on the join listener (server TLS, token auth).

    ``root_pem`` is the CA the caller pinned (from the token's fingerprint).
    """
    creds = grpc.ssl_channel_credentials(root_certificates=root_pem)
    async with grpc.aio.secure_channel(address, creds, options=_CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.IdentityStub(channel)
        try:
            resp = await stub.JoinNode(
                pb.JoinNodeRequest(token=token, csr=csr_pem, node=node), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            raise map_rpc_error(e, "join refused") from None
    return JoinResult(
        node=resp.node,
        cert_chain=tuple(resp.cert_chain),
        trust_bundle=tuple(resp.trust_bundle),
        trust_domain=resp.trust_domain,
        controller_address=resp.controller_address,
    )


class ControllerClient:
    """An mTLS channel to the controller's main listener, as one node."""

    def __init__(
        self,
        address: str,
        *,
        key_pem: bytes,
        cert_chain_pem: bytes,
        trust_bundle_pem: bytes,
    ) -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=trust_bundle_pem,
            private_key=key_pem,
            certificate_chain=cert_chain_pem,
        )
        self.address = address
        self._channel = grpc.aio.secure_channel(address, creds, options=_CHANNEL_OPTIONS)
        self._identity = pb_grpc.IdentityStub(self._channel)
        self._discovery = pb_grpc.DiscoveryStub(self._channel)

    async def create_certificate(
        self, csr_pem: bytes, identity: str, ttl_seconds: int = 0, timeout: float = 10.0
    ) -> tuple[bytes, ...]:
        """Returns the PEM chain, leaf first, or raises ApiError with the controller's reason."""
        req = pb.CreateCertificateRequest(csr=csr_pem, identity=identity, ttl_seconds=ttl_seconds)
        try:
            resp = await self._identity.CreateCertificate(req, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise map_rpc_error(e, f"certificate for {identity} refused") from None
        return tuple(resp.cert_chain)

    async def watch(
        self, node: str = "", types: Iterable[ResourceType] = (), epoch: str = "", version: int = 0
    ) -> AsyncIterator[WatchUpdate]:
        """Yields updates until the stream ends; raises ApiError on failure."""
        wire_types: list[int] = [int(t) for t in types]
        req = pb.WatchRequest(node=node, types=wire_types, epoch=epoch, version=version)  # type: ignore[arg-type]
        call = self._discovery.Watch(req)
        try:
            async for msg in call:
                yield watch_update_from_pb(msg)
        except grpc.aio.AioRpcError as e:
            raise map_rpc_error(e, "watch failed") from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> ControllerClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
