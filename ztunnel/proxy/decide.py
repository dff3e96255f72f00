"""Inbound decisions: given the snapshot and what arrived, what to do.

Like :func:`~ztunnel.proxy.route.route` for the outbound listener, these are
pure functions returning a small frozen value; the listener modules act on it
(answer, reset, dial, relay) and nothing here touches a socket.

:func:`decide_inbound` (15008, one HBONE CONNECT):

1. the destination must be an enrolled workload of this node, else no route;
2. the client address comes from the ``forwarded`` header, but only when the
   snapshot says that IP belongs to a workload with the *verified* peer
   identity (:func:`inbound_source`); else refused;
3. the destination's AuthorizationPolicy is evaluated for the peer identity,
   client IP and port.

:func:`decide_plaintext` (15006, a client outside the mesh):

1. the destination must be an enrolled workload of this node, else no route;
2. its effective PeerAuthentication mode: STRICT refuses;
3. its AuthorizationPolicy with no principal (so ``principals`` rules cannot
   match and ``notPrincipals: ["*"]`` does, Istio's way to deny
   unauthenticated callers);
4. a destination port equal to one of the ztunnel's own listeners is refused,
   since dialling it would loop back into this listener.

Choice and risk of the ``forwarded`` rule: that header is written by the
*source* ztunnel, which is authenticated only as the workload identity whose
certificate it presented. Taken blindly, a compromised node holding any
workload certificate could claim any source IP, defeating ``ipBlocks`` rules
and lying to the application about its caller. Binding the claimed IP to the
authenticated identity through the control-plane state closes that hole; the
price is that a pod the destination node does not know yet (a few hundred
milliseconds after it started) is refused until the state arrives, and the
client retries. A request without ``forwarded`` uses the HBONE connection's
own source address and is connected from this node's address, not
transparently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from controller.api.model import Workload
from node.policy import Connection, authorize, plaintext_verdict
from node.state import Snapshot, normalize_ip
from ztunnel.hbone import ConnectRequest

from .errors import FLAG_NO_ROUTE, FLAG_POLICY_DENIED
from .sockets import Address

__all__ = [
    "Admit",
    "InboundDecision",
    "InboundSource",
    "PlaintextDecision",
    "Reject",
    "decide_inbound",
    "decide_plaintext",
    "inbound_source",
]


@dataclass(frozen=True, slots=True)
class InboundSource:
    """Where an inbound tunnel's client is, and whether to connect as it."""

    ip: str
    port: int
    transparent: bool


@dataclass(frozen=True, slots=True)
class Admit:
    """Dial ``destination`` (as ``client`` when ``transparent``) and relay.

    ``authz`` is what was authorized, kept for re-checks when policy changes;
    ``policy`` the deciding policy, if one decided.
    """

    kind: ClassVar[str] = "admit"
    client: Address
    destination: Workload
    transparent: bool
    authz: Connection
    source: Workload | None = None  # the workload owning the client address
    policy: str | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the connection; ``reason`` and ``flags`` go to the access log."""

    kind: ClassVar[str] = "reject"
    reason: str
    flags: str  # FLAG_NO_ROUTE or FLAG_POLICY_DENIED
    client: Address
    destination: Workload | None = None
    source: Workload | None = None
    policy: str | None = None


InboundDecision = Admit | Reject
PlaintextDecision = Admit | Reject


def inbound_source(snapshot: Snapshot, request: ConnectRequest) -> InboundSource | str:
    """The client address to authorize and to connect from, or why the request
    is refused.

    The ``forwarded`` address is trusted only when it belongs to a workload
    whose identity is the verified peer identity.
    """
    if request.forwarded_for is None:
        ip, port = request.peer_addr
        # A dual-stack HBONE listener reports IPv4 peers as ::ffff:a.b.c.d.
        return InboundSource(normalize_ip(ip), port, transparent=False)
    ip, fport = request.forwarded_for
    owner = snapshot.workload_by_ip(ip)
    if owner is None:
        return f"forwarded client {ip} is not a known workload"
    if owner.identity != request.peer_identity:
        return (
            f"forwarded client {ip} belongs to {owner.identity}, "
            f"not to the authenticated peer {request.peer_identity}"
        )
    return InboundSource(ip, fport or 0, transparent=True)


def decide_inbound(snapshot: Snapshot, request: ConnectRequest) -> InboundDecision:
    """What to do with one HBONE CONNECT to ``request.host:request.port``.

    The HBONE layer already refused an authority whose IP is not the
    connection's L3 destination; the comparison is repeated here on canonical
    forms (``fd00::a`` and ``FD00:0::A`` are one address, ``::ffff:10.0.0.1``
    is ``10.0.0.1``) because this decision is what dials the pod, and a
    request built by other code must not pick another local workload.
    """
    source = inbound_source(snapshot, request)
    if isinstance(source, InboundSource):
        client = Address(source.ip, source.port)
    else:
        client = Address(normalize_ip(request.peer_addr[0]), request.peer_addr[1])
    owner = snapshot.workload_by_ip(client.ip)
    host = normalize_ip(request.host)
    if host != normalize_ip(request.l3_dst):
        return Reject(
            f"CONNECT authority {request.authority} is not the connection's destination "
            f"{request.l3_dst}",
            FLAG_NO_ROUTE,
            client,
            source=owner,
        )
    dest = snapshot.local_workload_by_ip(host)
    if dest is None:
        return Reject(
            f"{host} is not an enrolled workload of this node",
            FLAG_NO_ROUTE,
            client,
            source=owner,
        )
    if not isinstance(source, InboundSource):
        return Reject(source, FLAG_POLICY_DENIED, client, dest, owner)
    authz = Connection(
        src_ip=source.ip,
        dst_ip=host,
        dst_port=request.port,
        src_identity=request.peer_identity,
    )
    verdict = authorize(authz, snapshot, dest)
    if not verdict.allowed:
        return Reject(verdict.reason, FLAG_POLICY_DENIED, client, dest, owner, verdict.policy)
    return Admit(client, dest, source.transparent, authz, owner, verdict.policy)


def decide_plaintext(
    snapshot: Snapshot, client: Address, dst: Address, own_ports: frozenset[int] = frozenset()
) -> PlaintextDecision:
    """What to do with one plaintext connection from ``client`` to ``dst``."""
    dest = snapshot.workload_by_ip(dst.ip)
    owner = snapshot.workload_by_ip(client.ip)
    if dest is None or dest.node != snapshot.node or not dest.enrolled:
        return Reject(
            f"{dst.ip} is not an enrolled workload of this node", FLAG_NO_ROUTE, client, dest, owner
        )
    mode = plaintext_verdict(snapshot, dest)
    if not mode.allowed:
        return Reject(mode.reason, FLAG_POLICY_DENIED, client, dest, owner)
    authz = Connection(src_ip=client.ip, dst_ip=dst.ip, dst_port=dst.port, src_identity=None)
    verdict = authorize(authz, snapshot, dest)
    if not verdict.allowed:
        return Reject(verdict.reason, FLAG_POLICY_DENIED, client, dest, owner, verdict.policy)
    if dst.port in own_ports:
        return Reject(
            f"port {dst.port} is reserved for the ztunnel", FLAG_NO_ROUTE, client, dest, owner
        )
    return Admit(client, dest, True, authz, owner, verdict.policy)
