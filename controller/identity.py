"""The Identity service: node joins and node-scoped workload certificates.

:class:`IdentityService` implements :class:`controller.service.IdentityBackend`.
The decisions are pure functions with table-driven tests:

* :func:`parse_requested_identity`: the requested SPIFFE ID is valid and in our
  trust domain;
* :func:`authorize_identity`: node N may obtain ``ns/X/sa/Y`` only while the
  registry has a workload with namespace X and service account Y on N, and may
  renew its own node identity; nothing else. A waypoint principal
  ``waypoint/<ns>/<sa>/<pod>`` (admitted by the Kubernetes authenticator for a
  pod labelled ``veil.io/waypoint``) may obtain exactly ``ns/<ns>/sa/<sa>`` and
  renew its own channel identity; never a node's or another workload's;
* :func:`effective_ttl`: 0 means the default, above the maximum is clamped.

Every signature and every refusal is reported to an :class:`IssuanceRecorder`
(the controller's metrics) with a reason from a closed set.

The node name always comes from the verified credential (join token or mTLS
client certificate), never from a request field.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Protocol

from controller.api.errors import ApiError
from controller.api.model import JoinResult, RegistryState
from controller.api.spiffe import (
    WAYPOINT_PRINCIPAL_PREFIX,
    InvalidSpiffeId,
    SpiffeId,
    channel_identity,
    channel_principal,
)
from controller.auth.protocol import NodeAuthenticator
from controller.ca.authority import CertificateAuthority, IssuedCertificate
from controller.ca.csr import validate_csr
from controller.errors import ControllerError

__all__ = [
    "DEFAULT_CERT_TTL",
    "IdentityService",
    "IssuanceRecorder",
    "authorize_identity",
    "effective_ttl",
    "parse_requested_identity",
]

log = logging.getLogger("veil.controller.identity")

DEFAULT_CERT_TTL = timedelta(hours=24)

_Index = frozenset[tuple[str, str, str]]  # (node, namespace, service account)


class IssuanceRecorder(Protocol):
    """Counts signatures and refusals (controller.metrics.ControllerMetrics)."""

    def issued(self, kind: str) -> None: ...

    def refused(self, operation: str, reason: str) -> None: ...


class _NoRecorder:
    def issued(self, kind: str) -> None:
        pass

    def refused(self, operation: str, reason: str) -> None:
        pass


class _Refusal(Exception):
    """Carries the metric reason of an ApiError up to the RPC method that counts it."""

    def __init__(self, reason: str, error: ApiError) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


def parse_requested_identity(identity: str, trust_domain: str) -> SpiffeId:
    """The requested SPIFFE ID, or ApiError(INVALID_ARGUMENT) saying what is wrong."""
    try:
        sid = SpiffeId.parse(identity)
    except InvalidSpiffeId as e:
        raise ApiError(
            "INVALID_ARGUMENT", f"requested identity is invalid: {e.message}", hint=e.hint
        ) from None
    if sid.trust_domain != trust_domain:
        raise ApiError(
            "INVALID_ARGUMENT",
            f"requested identity {sid} is in trust domain {sid.trust_domain!r}; this controller "
            f"issues only for {trust_domain!r}",
        )
    if sid.workload is None and channel_principal(sid) is None:
        raise ApiError(
            "INVALID_ARGUMENT",
            f"requested identity {sid} is not a workload identity",
            hint=f"request spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>",
        )
    return sid


def workload_index(state: RegistryState) -> _Index:
    return frozenset((w.node, w.namespace, w.service_account) for w in state.workloads)


def authorize_identity(index: _Index, node: str, identity: SpiffeId) -> None:
    """Raises ApiError(PERMISSION_DENIED) unless ``node`` may hold ``identity``."""
    if node.startswith(WAYPOINT_PRINCIPAL_PREFIX):
        _authorize_waypoint(node, identity)
        return
    own = identity.node
    if own is not None:
        if own != node:
            raise ApiError(
                "PERMISSION_DENIED",
                f"node {node!r} may not obtain {identity}: it is another node's identity",
            )
        return
    workload = identity.workload
    if workload is None:
        raise ApiError("PERMISSION_DENIED", f"node {node!r} may not obtain {identity}")
    namespace, service_account = workload
    if (node, namespace, service_account) not in index:
        raise ApiError(
            "PERMISSION_DENIED",
            f"node {node!r} may not obtain {identity}: no workload with service account "
            f"{service_account!r} in namespace {namespace!r} is scheduled on that node",
            hint="identities are issued only to the node running a workload that uses them; "
            "check the workload's node and serviceAccount in the registry",
        )


def _authorize_waypoint(principal: str, identity: SpiffeId) -> None:
    """A waypoint pod holds its own channel identity and its ServiceAccount's SVID only.

    The service account comes from the caller's verified channel certificate,
    which the controller signed after TokenReview read the pod back, so the
    rule needs no registry: it does not depend on where the pod is scheduled.
    """
    if channel_principal(identity) == principal:
        return
    _, namespace, service_account, _pod = principal.split("/", 3)
    if identity.workload == (namespace, service_account):
        return
    raise ApiError(
        "PERMISSION_DENIED",
        f"waypoint {principal!r} may not obtain {identity}: a waypoint obtains only its own "
        f"service account's identity ns/{namespace}/sa/{service_account}",
        hint="run the waypoint as the ServiceAccount whose identity it should serve",
    )


def effective_ttl(
    requested_seconds: int, default: timedelta, maximum: timedelta
) -> tuple[timedelta, bool]:
    """(lifetime to issue, clamped?). 0 means ``default``; above ``maximum`` is clamped."""
    if requested_seconds < 0:
        raise ApiError(
            "INVALID_ARGUMENT",
            f"ttl_seconds is {requested_seconds}; use 0 for the default or a positive number",
        )
    if requested_seconds == 0:
        return min(default, maximum), default > maximum
    requested = timedelta(seconds=requested_seconds)
    if requested > maximum:
        return maximum, True
    return requested, False


class IdentityService:
    """Signs node certificates (JoinNode) and node-scoped SVIDs (CreateCertificate)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: NodeAuthenticator,
        registry: Callable[[], RegistryState],
        *,
        default_ttl: timedelta = DEFAULT_CERT_TTL,
        max_ttl: timedelta = DEFAULT_CERT_TTL,
        node_cert_ttl: timedelta = DEFAULT_CERT_TTL,
        recorder: IssuanceRecorder | None = None,
    ) -> None:
        for name, value in (
            ("default certificate TTL", default_ttl),
            ("maximum certificate TTL", max_ttl),
            ("node certificate TTL", node_cert_ttl),
        ):
            if value <= timedelta(0):
                raise ControllerError(f"the {name} must be positive, got {value}")
        if default_ttl > max_ttl:
            raise ControllerError(
                f"the default certificate TTL {default_ttl} exceeds the maximum {max_ttl}",
                hint="lower the default TTL or raise the maximum",
            )
        self._ca = ca
        self._authenticator = authenticator
        self._registry = registry
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._node_cert_ttl = node_cert_ttl
        self._index_of: tuple[RegistryState, _Index] | None = None
        self.recorder: IssuanceRecorder = recorder or _NoRecorder()
        # The main mTLS listener as bound (set by the server once it listens);
        # every join answer carries it so nodes never guess the port.
        self.mtls_address = ""

    def trust_domain(self) -> str:
        return self._ca.trust_domain

    def _index(self) -> _Index:
        state = self._registry()
        cached = self._index_of
        # RegistryState is immutable and replaced whole, so identity means "unchanged".
        if cached is None or cached[0] is not state:
            cached = (state, workload_index(state))
            self._index_of = cached
        return cached[1]

    def _issue(self, csr_pem: bytes, identity: SpiffeId, ttl: timedelta) -> IssuedCertificate:
        try:
            return self._ca.issue(csr_pem, identity, ttl)
        except ApiError as e:
            raise _Refusal("invalid_csr", e) from None
        except ControllerError as e:
            # The CA itself is unusable (expired, state unwritable): not the node's fault.
            log.error("cannot sign %s: %s", identity, e)
            raise _Refusal(
                "ca_unavailable",
                ApiError(
                    "UNAVAILABLE", f"the controller cannot sign certificates right now: {e.message}"
                ),
            ) from None

    async def join_node(self, token: str, csr_pem: bytes, node: str) -> JoinResult:
        try:
            result = await self._join_node(token, csr_pem, node)
        except _Refusal as r:
            self.recorder.refused("join", r.reason)
            raise r.error from None
        self.recorder.issued("join")
        return result

    async def create_certificate(
        self, node: str, csr_pem: bytes, identity: str, ttl_seconds: int
    ) -> tuple[bytes, ...]:
        try:
            kind, chain = self._create_certificate(node, csr_pem, identity, ttl_seconds)
        except _Refusal as r:
            self.recorder.refused("certificate", r.reason)
            raise r.error from None
        self.recorder.issued(kind)
        return chain

    async def _join_node(self, token: str, csr_pem: bytes, node: str) -> JoinResult:
        try:
            expected = channel_identity(self.trust_domain(), node)
        except InvalidSpiffeId as e:
            error = ApiError("INVALID_ARGUMENT", f"invalid node name: {e.message}", hint=e.hint)
            raise _Refusal("invalid_node_name", error) from None
        # Check the CSR before spending the single-use token on a request that would fail.
        with _reason("invalid_csr"):
            validate_csr(csr_pem, expected)
        try:
            verified = await self._authenticator.authenticate(token, node)
        except ApiError as e:
            # UNAVAILABLE and the like: the verifier (TokenReview) failed, not the node.
            bad = e.code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
            raise _Refusal("unauthenticated" if bad else "auth_unavailable", e) from None
        if verified != node:
            raise _Refusal(
                "unauthenticated",
                ApiError(
                    "UNAUTHENTICATED", f"the credential is for node {verified!r}, not {node!r}"
                ),
            )
        issued = self._issue(csr_pem, expected, self._node_cert_ttl)
        log.info(
            "node %s joined: issued %s serial=%x not_after=%s",
            node,
            expected,
            issued.serial,
            issued.not_after.isoformat(),
        )
        return JoinResult(
            node=node,
            cert_chain=issued.chain_pem,
            trust_bundle=self._ca.trust_bundle().roots,
            trust_domain=self.trust_domain(),
            controller_address=self.mtls_address,
        )

    def _create_certificate(
        self, node: str, csr_pem: bytes, identity: str, ttl_seconds: int
    ) -> tuple[str, tuple[bytes, ...]]:
        with _reason("invalid_identity"):
            sid = parse_requested_identity(identity, self.trust_domain())
        with _reason("not_scheduled"):
            authorize_identity(self._index(), node, sid)
        with _reason("invalid_ttl"):
            if channel_principal(sid) is not None:
                ttl, clamped = effective_ttl(ttl_seconds, self._node_cert_ttl, self._node_cert_ttl)
            else:
                ttl, clamped = effective_ttl(ttl_seconds, self._default_ttl, self._max_ttl)
        if clamped:
            log.info(
                "clamped requested lifetime %ss for %s to the maximum %s",
                ttl_seconds,
                sid,
                ttl,
            )
        # issue() validates the CSR (signature, P-256, the one URI SAN == sid).
        issued = self._issue(csr_pem, sid, ttl)
        log.info(
            "issued %s to node %s serial=%x not_after=%s",
            sid,
            node,
            issued.serial,
            issued.not_after.isoformat(),
        )
        return ("node" if channel_principal(sid) is not None else "workload"), issued.chain_pem


@contextlib.contextmanager
def _reason(reason: str) -> Iterator[None]:
    """Tags an ApiError raised inside with its metric reason."""
    try:
        yield
    except ApiError as e:
        raise _Refusal(reason, e) from None
