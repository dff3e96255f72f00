"""Outbound routing: given the snapshot and the captured addresses, what to do.

:func:`route` is a pure function (like Istio ztunnel's ``build_request``): the
outbound listener calls it with the original source and destination of a
captured connection and acts on the returned value; nothing here opens a
socket.

Decisions, in order:

1. The source must be an enrolled workload of this node that owns the source
   IP; anything else is refused (fail closed: we never send traffic under an
   identity we cannot attribute).
2. A destination ``VIP:port`` of a known service picks one ready endpoint (the
   choice is injectable so tests are deterministic) and maps the service port
   to the endpoint's target port. A service with no ready endpoint is refused.
   IPv4 and IPv6 VIPs are alike; an endpoint is reached at its address of the
   VIP's family when it has one.
3. An enrolled destination on another node goes over HBONE to
   ``<pod IP>:15008`` with the destination's expected SPIFFE identity.
4. An enrolled destination on this node is connected to directly
   (``SameNode``): the ztunnel holds both identities, nothing leaves the node.
5. A destination that opted into a waypoint (docs/waypoint.md) goes over
   HBONE to one ready replica of that waypoint (``ViaWaypoint``): a Service
   VIP when the Service's ``use_waypoint`` - or, when empty, its
   namespace's - names one; an enrolled workload IP when its namespace's
   does (a Service label covers traffic addressed to the Service, as in
   Istio). The waypoint lives in the labelling object's namespace unless
   ``veil.io/use-waypoint-namespace`` names another (``Snapshot.waypoint_of``).
   The CONNECT authority is the original destination, the client
   certificate is the source's, and the waypoint's identity is required. A
   waypoint with no ready replica refuses the connection: traffic that
   asked for L7 authorization never bypasses it. A waypoint's own
   connections are never sent to itself.
6. A destination outside the mesh (an unknown IP, or a known workload that is
   not enrolled) is connected to directly (``Passthrough``). Istio's ztunnel
   does the same: the mesh secures what it can, and traffic to the outside
   world keeps working. Addresses that only mean something on the pod's own
   link or host (IPv6 link-local, loopback, multicast, unspecified) are
   refused instead: dialled from the node they would reach node services.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from controller.api.model import Service, Workload
from controller.api.spiffe import SpiffeId
from node.dataplane import HBONE_PORT
from node.state.snapshot import Snapshot, normalize_ip

__all__ = [
    "REFUSE_NODE_SCOPED",
    "EndpointChooser",
    "Hbone",
    "Passthrough",
    "Refuse",
    "RoundRobin",
    "Route",
    "SameNode",
    "ViaWaypoint",
    "first_endpoint",
    "random_chooser",
    "route",
]

REFUSE_UNKNOWN_SOURCE = "source not a local enrolled workload"
REFUSE_NO_ENDPOINTS = "no healthy endpoints"
REFUSE_NODE_SCOPED = "destination only exists on the pod's own link or host"
REFUSE_NO_WAYPOINT = "no ready replica of waypoint"


def _node_scoped(ip: str) -> bool:
    """An address that, dialled from the node, would reach the node itself (or nothing).

    The pod meant its own link or its own host: the IPv6 link-local gateway
    (``fe80::1``) or the host veth's link-local address, loopback, the
    unspecified address, multicast. Passing such a connection through would
    hand the pod any node service bound to ``[::]`` or ``0.0.0.0``, outside
    every policy. IPv4 link-local (169.254/16) is not in the list: clouds
    serve instance metadata at 169.254.169.254 through the node's routes,
    and pods rely on reaching it.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return True  # not an address at all: nothing sensible to dial
    if addr.is_loopback or addr.is_unspecified or addr.is_multicast:
        return True
    return addr.version == 6 and addr.is_link_local


@dataclass(frozen=True, slots=True)
class Hbone:
    """Tunnel to ``hbone_addr`` and CONNECT to ``dst_ip:dst_port``; the server
    must present ``expected_identity``."""

    kind: ClassVar[str] = "hbone"
    source: Workload
    destination: Workload
    dst_ip: str
    dst_port: int
    expected_identity: SpiffeId
    hbone_addr: tuple[str, int]
    service: Service | None = None


@dataclass(frozen=True, slots=True)
class SameNode:
    """Both ends are enrolled workloads of this node: apply the destination's
    policy to the source identity and connect locally, without TLS."""

    kind: ClassVar[str] = "same_node"
    source: Workload
    destination: Workload
    dst_ip: str
    dst_port: int
    service: Service | None = None


@dataclass(frozen=True, slots=True)
class ViaWaypoint:
    """Tunnel to the waypoint replica at ``hbone_addr`` (it must present
    ``expected_identity``) and CONNECT to the original ``dst_ip:dst_port``;
    the waypoint applies L7 policy and forwards under its own identity."""

    kind: ClassVar[str] = "waypoint"
    source: Workload
    waypoint: Workload  # the chosen replica
    dst_ip: str  # the original destination: a Service VIP or a workload IP
    dst_port: int
    expected_identity: SpiffeId
    hbone_addr: tuple[str, int]
    service: Service | None = None
    destination: Workload | None = None  # a workload-addressed destination


@dataclass(frozen=True, slots=True)
class Passthrough:
    """The destination is outside the mesh: connect to it directly."""

    kind: ClassVar[str] = "passthrough"
    source: Workload
    dst_ip: str
    dst_port: int
    destination: Workload | None = None  # a known but not enrolled workload
    service: Service | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Close the captured connection; ``reason`` goes to the access log."""

    kind: ClassVar[str] = "refuse"
    reason: str
    source: Workload | None = None


Route = Hbone | SameNode | ViaWaypoint | Passthrough | Refuse

EndpointChooser = Callable[[Service, Sequence[Workload]], Workload]


def first_endpoint(service: Service, endpoints: Sequence[Workload]) -> Workload:
    """Deterministic: the endpoint with the smallest key (endpoints come sorted)."""
    return endpoints[0]


def random_chooser(rng: random.Random | None = None) -> EndpointChooser:
    """Uniform random choice; pass a seeded ``random.Random`` for repeatable runs."""
    r = rng if rng is not None else random.Random()

    def choose(service: Service, endpoints: Sequence[Workload]) -> Workload:
        return endpoints[r.randrange(len(endpoints))]

    return choose


class RoundRobin:
    """Round-robin over each service's ready endpoints (a counter per service)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def __call__(self, service: Service, endpoints: Sequence[Workload]) -> Workload:
        i = self._next.get(service.key, 0)
        self._next[service.key] = i + 1
        return endpoints[i % len(endpoints)]


def _version(ip: str) -> int:
    """4 or 6 for an address (IPv4-mapped IPv6 counts as 4), 0 for anything else."""
    try:
        return ipaddress.ip_address(normalize_ip(ip)).version
    except ValueError:
        return 0


def _has_family(workload: Workload, version: int) -> bool:
    return any(_version(ip) == version for ip in workload.ips)


def _same_family_ip(workload: Workload, like: str) -> str:
    """The workload's IP in the same address family as ``like`` (else its first).

    A client that dialled a Service over IPv6 reaches the endpoint's IPv6
    address, so the pod sees the client's real (IPv6) address; only an
    endpoint with no address of that family is reached over the other one.
    Callers pass only workloads with at least one IP.
    """
    version = _version(like)
    for ip in workload.ips:
        if _version(ip) == version:
            return normalize_ip(ip)
    return normalize_ip(workload.ips[0])


def _via_waypoint(
    snapshot: Snapshot,
    source: Workload,
    name: str,
    namespace: str,
    dst_ip: str,
    dst_port: int,
    service: Service | None,
    destination: Workload | None,
    choose: EndpointChooser,
) -> Route:
    replicas = snapshot.waypoints.get((namespace, name), ())
    version = _version(dst_ip)
    same_family = [w for w in replicas if _has_family(w, version)]
    candidates = same_family or list(replicas)
    if not candidates:
        what = service.key if service is not None else f"{dst_ip}:{dst_port}"
        return Refuse(reason=f"{REFUSE_NO_WAYPOINT} {namespace}/{name} for {what}", source=source)
    # The chooser balances per Service; a synthetic one keys the waypoint.
    waypoint_service = Service(name=name, namespace=namespace, vips=(), ports=())
    replica = choose(waypoint_service, candidates)
    return ViaWaypoint(
        source=source,
        waypoint=replica,
        dst_ip=dst_ip,
        dst_port=dst_port,
        expected_identity=replica.identity,
        hbone_addr=(_same_family_ip(replica, dst_ip), HBONE_PORT),
        service=service,
        destination=destination,
    )


def _to_workload(
    snapshot: Snapshot,
    source: Workload,
    dest: Workload,
    dst_ip: str,
    dst_port: int,
    service: Service | None,
) -> Route:
    if not dest.enrolled:
        return Passthrough(
            source=source,
            dst_ip=dst_ip,
            dst_port=dst_port,
            destination=dest,
            service=service,
            reason=f"destination {dest.key} is not enrolled in the mesh",
        )
    if dest.node == snapshot.node:
        return SameNode(
            source=source, destination=dest, dst_ip=dst_ip, dst_port=dst_port, service=service
        )
    return Hbone(
        source=source,
        destination=dest,
        dst_ip=dst_ip,
        dst_port=dst_port,
        expected_identity=dest.identity,
        hbone_addr=(dst_ip, HBONE_PORT),
        service=service,
    )


def route(
    snapshot: Snapshot,
    src_ip: str,
    dst_ip: str,
    dst_port: int,
    *,
    choose: EndpointChooser = first_endpoint,
) -> Route:
    """Decides how to carry a connection captured on the outbound listener.

    ``snapshot.node`` is this ztunnel's node. Pure: the same inputs give the
    same route (given a deterministic ``choose``).
    """
    source = snapshot.local_workload_by_ip(src_ip)
    if source is None:
        return Refuse(reason=REFUSE_UNKNOWN_SOURCE)
    dst = normalize_ip(dst_ip)

    svc = snapshot.service_at(dst, dst_port)
    if svc is not None:
        service, port = svc
        ref = snapshot.waypoint_of(service.namespace, service)
        if ref is not None and ref != (source.namespace, source.waypoint):
            # The waypoint picks the endpoint (per request) and answers 503
            # when there is none.
            return _via_waypoint(
                snapshot, source, ref[1], ref[0], dst, dst_port, service, None, choose
            )
        healthy = [w for w in snapshot.endpoints(service) if w.ready and w.ips]
        if not healthy:
            return Refuse(reason=f"{REFUSE_NO_ENDPOINTS} for service {service.key}", source=source)
        # Endpoints reachable in the VIP's own family first (dual-stack
        # Services); single-stack endpoints of the other family only when no
        # endpoint has one.
        version = _version(dst)
        same_family = [w for w in healthy if _has_family(w, version)]
        endpoint = choose(service, same_family or healthy)
        ep_ip = _same_family_ip(endpoint, dst)
        return _to_workload(snapshot, source, endpoint, ep_ip, port.target_port, service)
    if snapshot.is_vip(dst):
        # A service address but not one of its ports: nothing listens there.
        return Refuse(reason=f"no service port {dst_port} at virtual IP {dst}", source=source)

    dest = snapshot.workload_by_ip(dst)
    if dest is None:
        if _node_scoped(dst):
            return Refuse(reason=f"{REFUSE_NODE_SCOPED}: {dst}", source=source)
        return Passthrough(
            source=source,
            dst_ip=dst,
            dst_port=dst_port,
            reason="destination is not a known workload",
        )
    if dest.enrolled and not dest.waypoint:
        ref = snapshot.waypoint_of(dest.namespace)
        if ref is not None and ref != (source.namespace, source.waypoint):
            return _via_waypoint(
                snapshot, source, ref[1], ref[0], dst, dst_port, None, dest, choose
            )
    return _to_workload(snapshot, source, dest, dst, dst_port, None)
