"""What one waypoint serves, derived once per state change (pure).

:func:`build_view` turns the node's :class:`~node.state.Snapshot` into a
:class:`WaypointView`: for every destination that opted into this waypoint
(a Service whose ``use_waypoint`` - or, when empty, its namespace's label -
names it, and the workloads behind such services or in such a namespace), the
compiled L7 policies, the JWT authenticator and the ready endpoints. The data
path then does dictionary lookups only.

Attachment, as in Istio: AuthorizationPolicies apply at the waypoint when
their ``targetRefs`` name it (kind ``Gateway``) or the destination Service
(kind ``Service``); selector policies are enforced by the ztunnels.
RequestAuthentications apply when attached the same way, and also when they
have neither selector nor ``targetRefs`` (namespace-wide in the destination's
namespace, or mesh-wide in the root namespace).

A destination may live in another namespace than the waypoint: its label
``veil.io/use-waypoint-namespace`` names the waypoint's namespace
(:meth:`~node.state.Snapshot.waypoint_of`). A ``Gateway`` reference is then
read in the waypoint's namespace, a ``Service`` reference in the
destination's, as Istio does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controller.api.model import (
    ROOT_NAMESPACE,
    AuthorizationPolicy,
    JwtRule,
    RequestAuthentication,
    TargetRef,
    Workload,
)
from controller.api.spiffe import SpiffeId, workload_identity
from node.policy import L7PolicySet, attached_to, compile_l7_policy
from node.state import Snapshot
from node.state.snapshot import normalize_ip

from .authn import Authenticator

__all__ = ["Destination", "Endpoint", "WaypointView", "build_view", "port_speaks_http2"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a request can go: a ready workload, its address and target port."""

    workload: str  # "<ns>/<name>"
    ip: str
    port: int
    identity: SpiffeId

    @property
    def key(self) -> tuple[str, int]:
        return (self.ip, self.port)


_HTTP2_PORT_PROTOCOLS = ("grpc", "http2", "h2c")


def port_speaks_http2(name: str) -> bool:
    """A port named ``grpc``, ``grpc-<x>``, ``http2``, ``h2c``... (not ``grpc-web``,
    which is HTTP/1.1-compatible) carries HTTP/2."""
    proto = name.lower().split("-", 1)[0]
    return proto in _HTTP2_PORT_PROTOCOLS and not name.lower().startswith("grpc-web")


@dataclass(frozen=True, slots=True)
class Destination:
    """One destination (a service port, or one workload) behind this waypoint."""

    kind: str  # "service" or "workload"
    namespace: str
    name: str
    port: int  # the port the client asked for
    endpoints: tuple[Endpoint, ...]
    policies: L7PolicySet
    authn: Authenticator
    identity: SpiffeId | None = None  # a workload destination's identity
    # The Service port declares HTTP/2 by its name (Istio's convention:
    # ``grpc``, ``http2``, ``h2c``, alone or before ``-``): requests leave as HTTP/2.
    http2: bool = False

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.namespace}/{self.name}:{self.port}"

    def to_json(self) -> dict[str, object]:
        return {
            "destination": self.key,
            "endpoints": [f"{e.workload} {e.ip}:{e.port}" for e in self.endpoints],
            "policies": list(self.policies.keys),
            "jwt_issuers": [p.issuer for p in self.authn.providers],
        }


@dataclass(frozen=True, slots=True)
class WaypointView:
    namespace: str
    name: str
    version: int = 0
    identity: SpiffeId | None = None
    # (ip, port) -> destination; workloads are keyed with the port asked for
    # filled in on lookup (a workload accepts any port).
    services: Mapping[tuple[str, int], Destination] = field(
        default_factory=lambda: MappingProxyType({})
    )
    workloads: Mapping[str, tuple[Workload, L7PolicySet, Authenticator]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def resolve(self, ip: str, port: int) -> Destination | None:
        """The destination a CONNECT to ``ip:port`` addresses, if this waypoint serves it."""
        nip = normalize_ip(ip)
        dest = self.services.get((nip, port))
        if dest is not None:
            return dest
        held = self.workloads.get(nip)
        if held is None:
            return None
        w, policies, authn = held
        endpoints = (Endpoint(w.key, nip, port, w.identity),) if w.ready else ()
        return Destination(
            "workload", w.namespace, w.name, port, endpoints, policies, authn, w.identity
        )

    def destinations(self) -> list[Destination]:
        """Each service destination once (a dual-stack Service has a key per VIP)."""
        unique = {d.key: d for d in self.services.values()}
        return [unique[k] for k in sorted(unique)]


def _attached(
    refs: Iterable[TargetRef],
    policy_namespace: str,
    waypoint: tuple[str, str],
    dest_namespace: str,
    services: Iterable[str],
) -> bool:
    """Whether ``refs`` name this waypoint (kind Gateway, in the waypoint's
    namespace) or one of the destination's Services (in the destination's
    namespace, which differs from the waypoint's for a cross-namespace waypoint)."""
    ns, name = waypoint
    if attached_to(refs, policy_namespace=policy_namespace, namespace=ns, waypoint=name):
        return True
    return any(
        attached_to(
            [r for r in refs if r.kind == "Service"],
            policy_namespace=policy_namespace,
            namespace=dest_namespace,
            waypoint=name,
            service=s,
        )
        for s in services
    )


def _policies(
    policies: Iterable[AuthorizationPolicy],
    waypoint: tuple[str, str],
    dest_namespace: str,
    services: Iterable[str],
) -> L7PolicySet:
    names = tuple(services)
    chosen = [
        p
        for p in policies
        if p.target_refs and _attached(p.target_refs, p.namespace, waypoint, dest_namespace, names)
    ]
    return L7PolicySet.of(compile_l7_policy(p) for p in chosen)


def _authn(
    auths: Iterable[RequestAuthentication],
    waypoint: tuple[str, str],
    dest_namespace: str,
    services: Iterable[str],
) -> Authenticator:
    names = tuple(services)
    rules: list[JwtRule] = []
    for a in sorted(auths, key=lambda a: a.key):
        if a.target_refs:
            hit = _attached(a.target_refs, a.namespace, waypoint, dest_namespace, names)
        else:
            hit = a.selector is None and a.namespace in (dest_namespace, ROOT_NAMESPACE)
        if hit:
            rules.extend(a.jwt_rules)
    return Authenticator.compile(rules)


def _endpoint(w: Workload, port: int) -> Endpoint | None:
    if not w.ready or not w.ips:
        return None
    return Endpoint(w.key, normalize_ip(w.ips[0]), port, w.identity)


def build_view(snapshot: Snapshot, namespace: str, name: str, service_account: str) -> WaypointView:
    """Everything this waypoint serves at ``snapshot``; pure."""
    me = (namespace, name)
    policies = list(snapshot.policies.values())
    auths = list(snapshot.request_authentications.values())
    services: dict[tuple[str, int], Destination] = {}
    served: dict[str, set[str]] = {}  # workload key -> names of services using us
    for svc in sorted(snapshot.services.values(), key=lambda s: s.key):
        if snapshot.waypoint_of(svc.namespace, svc) != me:
            continue
        members = snapshot.endpoints(svc)
        for w in members:
            served.setdefault(w.key, set()).add(svc.name)
        pset = _policies(policies, me, svc.namespace, (svc.name,))
        authn = _authn(auths, me, svc.namespace, (svc.name,))
        for sp in svc.ports:
            eps = tuple(e for w in members if (e := _endpoint(w, sp.target_port)) is not None)
            dest = Destination(
                "service", svc.namespace, svc.name, sp.port, eps, pset, authn,
                http2=port_speaks_http2(sp.name),
            )  # fmt: skip
            for vip in svc.vips:
                services[(normalize_ip(vip), sp.port)] = dest
    workloads: dict[str, tuple[Workload, L7PolicySet, Authenticator]] = {}
    ns_uses: dict[str, bool] = {}  # namespace -> its label names this waypoint
    for w in snapshot.workloads.values():
        if w.waypoint:
            continue
        uses = ns_uses.get(w.namespace)
        if uses is None:
            uses = ns_uses[w.namespace] = snapshot.waypoint_of(w.namespace) == me
        svc_names = served.get(w.key, set())
        if not svc_names and not uses:
            continue
        entry = (
            w,
            _policies(policies, me, w.namespace, sorted(svc_names)),
            _authn(auths, me, w.namespace, sorted(svc_names)),
        )
        for ip in w.ips:
            workloads[normalize_ip(ip)] = entry
    return WaypointView(
        namespace=namespace,
        name=name,
        version=snapshot.version,
        identity=workload_identity(snapshot.trust_domain, namespace, service_account),
        services=MappingProxyType(services),
        workloads=MappingProxyType(workloads),
    )
