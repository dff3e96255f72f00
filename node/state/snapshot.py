"""The immutable, indexed view of the control-plane state a ztunnel serves from.

A :class:`Snapshot` is built whole by :func:`build_snapshot` from the resources
the controller sent (outside any lock) and then swapped in by
:class:`~node.state.store.StateStore`. Readers (routing, policy, admin) take
the current snapshot once per decision and never see a half-applied update.

Indexes answer the data path's questions in O(1): which workload owns an IP,
which service sits at a VIP:port, which workloads run on this node, which
policies live in a namespace. Work that depends only on the state is done
here, once per snapshot and outside the data path: every policy is compiled,
and each local workload gets its applicable policies, compiled and in
evaluation order (:class:`~node.policy.PolicySet`).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from controller.api.model import (
    ROOT_NAMESPACE,
    AuthorizationPolicy,
    Namespace,
    PeerAuthentication,
    RequestAuthentication,
    Resource,
    Service,
    ServicePort,
    TrustBundle,
    Workload,
)
from controller.api.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from node.policy.authz import PolicySet
from node.policy.match import CompiledPolicy, compile_policy

__all__ = ["Snapshot", "build_snapshot", "empty_snapshot", "normalize_ip"]

log = logging.getLogger("veil.node.state")


@functools.lru_cache(maxsize=65536)
def normalize_ip(ip: str) -> str:
    """The canonical text of an IP address, or ``ip`` unchanged when it is not one.

    Memoised (bounded): the same pod and peer addresses recur on every
    connection, and ``ipaddress`` parsing costs tens of microseconds each.

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``, what a dual-stack socket
    reports for an IPv4 peer) become plain IPv4 so they find the same workload.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return addr.compressed


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a ztunnel knows at one version, with lookup indexes.

    ``synced`` is False only for the empty snapshot a store starts with, before
    the controller's first answer; readiness waits for it.
    """

    node: str
    epoch: str = ""
    version: int = 0
    synced: bool = False
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    trust_bundle: TrustBundle | None = None
    namespaces: Mapping[str, Namespace] = field(default_factory=lambda: MappingProxyType({}))
    workloads: Mapping[str, Workload] = field(default_factory=lambda: MappingProxyType({}))
    services: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    policies: Mapping[str, AuthorizationPolicy] = field(
        default_factory=lambda: MappingProxyType({})
    )
    peer_authentications: Mapping[str, PeerAuthentication] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # JWT rules; only a waypoint reads them.
    request_authentications: Mapping[str, RequestAuthentication] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # Indexes (derived; built by build_snapshot).
    by_ip: Mapping[str, Workload] = field(default_factory=lambda: MappingProxyType({}))
    by_vip_port: Mapping[tuple[str, int], tuple[Service, ServicePort]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    vips: frozenset[str] = frozenset()
    local_workloads: tuple[Workload, ...] = ()
    local_identity_set: frozenset[SpiffeId] = frozenset()
    policies_by_namespace: Mapping[str, tuple[AuthorizationPolicy, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    peer_auth_by_namespace: Mapping[str, tuple[PeerAuthentication, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    service_endpoints: Mapping[str, tuple[Workload, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # Every policy compiled, by key.
    compiled_policies: Mapping[str, CompiledPolicy] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # The applicable policies of each workload of this node, by workload key:
    # as written (admin, in policies_for order) and compiled (evaluation).
    local_policies: Mapping[str, tuple[AuthorizationPolicy, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    local_policy_sets: Mapping[str, PolicySet] = field(default_factory=lambda: MappingProxyType({}))
    # Waypoint replicas (label veil.io/waypoint) by (namespace, waypoint name),
    # ready ones with an address only, sorted by key: the source ztunnel's
    # route() picks one per connection.
    waypoints: Mapping[tuple[str, str], tuple[Workload, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    # -- lookups ---------------------------------------------------------------

    def workload_by_ip(self, ip: str) -> Workload | None:
        """The workload that owns ``ip``, if any (any node, enrolled or not)."""
        return self.by_ip.get(normalize_ip(ip))

    def service_at(self, ip: str, port: int) -> tuple[Service, ServicePort] | None:
        """The service and port listening at the virtual address ``ip:port``."""
        return self.by_vip_port.get((normalize_ip(ip), port))

    def is_vip(self, ip: str) -> bool:
        return normalize_ip(ip) in self.vips

    def local_workload_by_ip(self, ip: str) -> Workload | None:
        """The enrolled workload of this node that owns ``ip`` (a valid source)."""
        w = self.workload_by_ip(ip)
        if w is None or w.node != self.node or not w.enrolled:
            return None
        return w

    def endpoints(self, service: Service) -> tuple[Workload, ...]:
        """The service's endpoint workloads that this snapshot knows, in key order."""
        held = self.service_endpoints.get(service.key)
        if held is not None and self.services.get(service.key) is service:
            return held
        return _endpoints(service, self.workloads)

    def waypoint_of(self, namespace: str, service: Service | None = None) -> tuple[str, str] | None:
        """``(namespace, name)`` of the waypoint a destination uses, None for none.

        The Service's own ``veil.io/use-waypoint`` wins; else its (or the
        workload's) namespace's. Either may name a waypoint in another namespace
        with ``veil.io/use-waypoint-namespace`` (docs/waypoint.md).
        """
        if service is not None and (ref := service.waypoint) is not None:
            return ref
        ns = self.namespaces.get(namespace)
        return ns.waypoint if ns is not None else None

    def local_identities(self) -> frozenset[SpiffeId]:
        """Identities this node needs certificates for (its enrolled workloads)."""
        return self.local_identity_set

    def _is_local(self, workload: Workload) -> bool:
        # The precomputed sets hold for this snapshot's own workload object;
        # any other (another node's, or one a caller made up) is computed.
        return self.workloads.get(workload.key) is workload and workload.node == self.node

    def policies_for(self, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
        """Authorization policies that apply to ``workload``.

        A policy applies when it is in the workload's namespace and its selector
        matches the workload's labels (no selector: the whole namespace), or when
        it is in the root namespace with no selector (mesh-wide). A root-namespace
        policy with a selector applies, like in Istio, to matching workloads in
        every namespace. Precomputed for this node's workloads.
        """
        if self._is_local(workload):
            return self.local_policies.get(workload.key, ())
        return _applicable(self.policies_by_namespace, workload)

    def policy_set_for(self, workload: Workload) -> PolicySet:
        """The compiled policies of :meth:`policies_for`, in evaluation order.

        A lookup for this node's workloads (the ones it authorizes for); other
        workloads (admin views, tests) are compiled on the way.
        """
        if self._is_local(workload):
            held = self.local_policy_sets.get(workload.key)
            if held is not None:
                return held
        return _policy_set(
            _applicable(self.policies_by_namespace, workload), self.compiled_policies
        )

    def peer_authentications_in(self, namespace: str) -> tuple[PeerAuthentication, ...]:
        return self.peer_auth_by_namespace.get(namespace, ())


def _applicable(
    by_namespace: Mapping[str, Sequence[AuthorizationPolicy]], workload: Workload
) -> tuple[AuthorizationPolicy, ...]:
    out: list[AuthorizationPolicy] = []
    for p in by_namespace.get(workload.namespace, ()):
        if p.selector is None or p.selector.matches(workload.labels):
            out.append(p)
    if workload.namespace != ROOT_NAMESPACE:
        for p in by_namespace.get(ROOT_NAMESPACE, ()):
            if p.selector is None or p.selector.matches(workload.labels):
                out.append(p)
    return tuple(out)


def _policy_set(
    policies: Iterable[AuthorizationPolicy], compiled: Mapping[str, CompiledPolicy]
) -> PolicySet:
    out: list[CompiledPolicy] = []
    for p in policies:
        held = compiled.get(p.key)
        out.append(held if held is not None else compile_policy(p))
    return PolicySet.of(out)


def _endpoints(service: Service, workloads: Mapping[str, Workload]) -> tuple[Workload, ...]:
    return tuple(workloads[k] for k in sorted(set(service.endpoints)) if k in workloads)


def empty_snapshot(node: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Snapshot:
    """The not-yet-synced snapshot a store holds before the controller answers."""
    return Snapshot(node=node, trust_domain=trust_domain)


def _prefer(a: Workload, b: Workload) -> Workload:
    """Which of two workloads claiming one IP wins (pod churn reuses IPs).

    A ready workload beats a not-ready one; otherwise the smaller key wins, so
    the choice is deterministic whichever order the updates arrived in.
    """
    if a.ready != b.ready:
        return a if a.ready else b
    return a if a.key <= b.key else b


def build_snapshot(
    node: str,
    resources: Iterable[Resource],
    *,
    epoch: str,
    version: int,
    trust_bundle: TrustBundle | None,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    previous: Snapshot | None = None,
) -> Snapshot:
    """Builds an indexed snapshot from a complete set of resources.

    Pure: no locks, no IO, so the store calls it before swapping anything in.
    ``previous`` lends its compiled form of every policy object that did not
    change, so an update compiles only what it brought.
    """
    namespaces: dict[str, Namespace] = {}
    workloads: dict[str, Workload] = {}
    services: dict[str, Service] = {}
    policies: dict[str, AuthorizationPolicy] = {}
    peer_auths: dict[str, PeerAuthentication] = {}
    request_auths: dict[str, RequestAuthentication] = {}
    for r in resources:
        if isinstance(r, Namespace):
            namespaces[r.key] = r
        elif isinstance(r, Workload):
            workloads[r.key] = r
        elif isinstance(r, Service):
            services[r.key] = r
        elif isinstance(r, AuthorizationPolicy):
            policies[r.key] = r
        elif isinstance(r, PeerAuthentication):
            peer_auths[r.key] = r
        elif isinstance(r, RequestAuthentication):
            request_auths[r.key] = r

    by_ip: dict[str, Workload] = {}
    for w in workloads.values():
        for ip in w.ips:
            nip = normalize_ip(ip)
            held = by_ip.get(nip)
            if held is not None and held.key != w.key:
                winner = _prefer(held, w)
                log.warning(
                    "workloads %s and %s both claim IP %s; using %s",
                    held.key,
                    w.key,
                    nip,
                    winner.key,
                )
                by_ip[nip] = winner
            else:
                by_ip[nip] = w

    by_vip_port: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
    vips: set[str] = set()
    for s in sorted(services.values(), key=lambda s: s.key):
        for vip in s.vips:
            nvip = normalize_ip(vip)
            vips.add(nvip)
            for sp in s.ports:
                by_vip_port.setdefault((nvip, sp.port), (s, sp))

    local = tuple(sorted((w for w in workloads.values() if w.node == node), key=lambda w: w.key))
    identities = frozenset(w.identity for w in local if w.enrolled)

    pol_by_ns: dict[str, list[AuthorizationPolicy]] = {}
    for p in sorted(policies.values(), key=lambda p: p.key):
        pol_by_ns.setdefault(p.namespace, []).append(p)
    compiled = _compile_all(policies, previous)
    local_policies = {w.key: _applicable(pol_by_ns, w) for w in local}
    local_sets = {k: _policy_set(ps, compiled) for k, ps in local_policies.items()}
    pa_by_ns: dict[str, list[PeerAuthentication]] = {}
    for a in sorted(peer_auths.values(), key=lambda a: a.key):
        pa_by_ns.setdefault(a.namespace, []).append(a)
    waypoints: dict[tuple[str, str], list[Workload]] = {}
    for w in sorted(workloads.values(), key=lambda w: w.key):
        if w.waypoint and w.ready and w.ips:
            waypoints.setdefault((w.namespace, w.waypoint), []).append(w)

    return Snapshot(
        node=node,
        epoch=epoch,
        version=version,
        synced=True,
        trust_domain=trust_bundle.trust_domain if trust_bundle is not None else trust_domain,
        trust_bundle=trust_bundle,
        namespaces=MappingProxyType(namespaces),
        workloads=MappingProxyType(workloads),
        services=MappingProxyType(services),
        policies=MappingProxyType(policies),
        peer_authentications=MappingProxyType(peer_auths),
        request_authentications=MappingProxyType(request_auths),
        by_ip=MappingProxyType(by_ip),
        by_vip_port=MappingProxyType(by_vip_port),
        vips=frozenset(vips),
        local_workloads=local,
        local_identity_set=identities,
        policies_by_namespace=MappingProxyType({k: tuple(v) for k, v in pol_by_ns.items()}),
        peer_auth_by_namespace=MappingProxyType({k: tuple(v) for k, v in pa_by_ns.items()}),
        service_endpoints=MappingProxyType(
            {k: _endpoints(s, workloads) for k, s in services.items()}
        ),
        compiled_policies=MappingProxyType(compiled),
        local_policies=MappingProxyType(local_policies),
        local_policy_sets=MappingProxyType(local_sets),
        waypoints=MappingProxyType({k: tuple(v) for k, v in waypoints.items()}),
    )


def _compile_all(
    policies: Mapping[str, AuthorizationPolicy], previous: Snapshot | None
) -> dict[str, CompiledPolicy]:
    """Every policy compiled; an unchanged policy object keeps its compiled form."""
    out: dict[str, CompiledPolicy] = {}
    for key, p in policies.items():
        prev = previous.policies.get(key) if previous is not None else None
        # Resyncs bring new but equal objects; comparing is far cheaper than
        # compiling (IP parsing).
        if previous is not None and prev is not None and (prev is p or prev == p):
            held = previous.compiled_policies.get(key)
            if held is not None:
                out[key] = held
                continue
        out[key] = compile_policy(p)
    return out
