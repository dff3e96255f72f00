"""Assembling one consistent RegistryState from parsed objects.

Every registry source ends here, so the YAML file and Kubernetes produce the same
state from the same objects. :func:`build_state` checks what only the whole set
can reveal (duplicate keys, an IP claimed by two workloads, a reference to an
undeclared namespace) and computes the derived fields:

* ``Workload.enrolled``: the namespace is labelled ``veil.io/dataplane-mode:
  ambient`` and the pod is not labelled ``veil.io/dataplane-mode: none``;
* ``Service.endpoints``: the ready workloads of the Service's namespace whose
  labels match its selector (a Service without a selector has none, as in
  Kubernetes).

Output tuples are sorted by key so equal inputs give equal states.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from controller.api.model import (
    DATAPLANE_MODE_LABEL,
    OPT_OUT,
    ROOT_NAMESPACE,
    AuthorizationPolicy,
    Namespace,
    PeerAuthentication,
    RegistryState,
    RequestAuthentication,
    Resource,
    ResourceType,
    Service,
    Workload,
    resource_key,
)
from controller.api.spiffe import InvalidSpiffeId, validate_trust_domain

from .errors import RegistryError

__all__ = ["Origin", "build_state", "describe", "is_enrolled"]

# Maps a resource key to how its source names it (e.g. "workloads[3] (shop/checkout)").
Origin = Mapping[tuple[ResourceType, str], str]

_KIND = {
    ResourceType.NAMESPACE: "Namespace",
    ResourceType.WORKLOAD: "Workload",
    ResourceType.SERVICE: "Service",
    ResourceType.AUTHORIZATION_POLICY: "AuthorizationPolicy",
    ResourceType.PEER_AUTHENTICATION: "PeerAuthentication",
    ResourceType.REQUEST_AUTHENTICATION: "RequestAuthentication",
}


def describe(resource: Resource, origin: Origin | None = None) -> str:
    """How to name ``resource`` in an error: its source location, else kind and key."""
    key = resource_key(resource)
    if origin is not None and key in origin:
        return origin[key]
    return f"{_KIND[key[0]]} {key[1]}"


def is_enrolled(namespace: Namespace | None, workload: Workload) -> bool:
    """The enrollment rule: ambient namespace, and the pod has not opted out."""
    return (
        namespace is not None
        and namespace.enrolled
        and workload.labels.get(DATAPLANE_MODE_LABEL) != OPT_OUT
    )


R = TypeVar(
    "R",
    Namespace,
    Workload,
    Service,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
)


def _unique(items: Iterable[R], describe_one: Callable[[R], str]) -> dict[str, R]:
    out: dict[str, R] = {}
    for item in items:
        prev = out.get(item.key)
        if prev is not None:
            raise RegistryError(
                f"duplicate key {item.key}; {describe_one(prev)} has the same name",
                hint="names are unique per namespace (per kind); rename or remove one",
                where=describe_one(item),
            )
        out[item.key] = item
    return out


def build_state(
    trust_domain: str,
    namespaces: Iterable[Namespace],
    workloads: Iterable[Workload],
    services: Iterable[Service] = (),
    authorization_policies: Iterable[AuthorizationPolicy] = (),
    peer_authentications: Iterable[PeerAuthentication] = (),
    request_authentications: Iterable[RequestAuthentication] = (),
    *,
    origin: Origin | None = None,
) -> RegistryState:
    """One validated RegistryState with ``enrolled`` and ``endpoints`` computed.

    The inputs' own ``enrolled``, ``trust_domain`` and ``endpoints`` fields are
    ignored and recomputed. Policies in the root namespace (``veil-system``)
    need no Namespace object: that namespace always exists for the mesh.
    Raises :class:`RegistryError` naming the offending object (via ``origin``).
    """
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as e:
        raise RegistryError(e.message, hint=e.hint, field="trustDomain") from None

    def name(r: Resource) -> str:
        return describe(r, origin)

    ns_by_name = _unique(namespaces, name)
    wl_by_key = _unique(workloads, name)
    svc_by_key = _unique(services, name)
    authz_by_key = _unique(authorization_policies, name)
    peer_by_key = _unique(peer_authentications, name)
    ra_by_key = _unique(request_authentications, name)

    def check_namespace(r: Resource, namespace: str, root_ok: bool) -> None:
        if namespace in ns_by_name or (root_ok and namespace == ROOT_NAMESPACE):
            return
        raise RegistryError(
            f"namespace {namespace!r} is not declared",
            hint=f"add {{name: {namespace}}} under namespaces (with the label "
            f"{DATAPLANE_MODE_LABEL}: ambient to enroll it)",
            where=name(r),
            field="namespace",
        )

    # Only the first label of each Service selector is indexed: a Service's
    # candidates are the workloads carrying it, not the whole namespace.
    svc_items = sorted(svc_by_key.items())
    index_keys = {next(iter(s.selector)) for _, s in svc_items if len(s.selector)}
    by_label: dict[tuple[str, str, str], list[Workload]] = defaultdict(list)
    ip_owner: dict[str, Workload] = {}
    built_workloads: list[Workload] = []
    for key in sorted(wl_by_key):
        w = wl_by_key[key]
        if w.namespace not in ns_by_name:
            check_namespace(w, w.namespace, root_ok=False)
        for i, ip in enumerate(w.ips):
            other = ip_owner.setdefault(ip, w)
            if other is not w:
                raise RegistryError(
                    f"{ip} is already used by {name(other)}",
                    hint="each pod IP belongs to exactly one workload; the IP identifies it",
                    where=name(w),
                    field=f"ips[{i}]",
                )
        enrolled = is_enrolled(ns_by_name.get(w.namespace), w)
        built = w
        # Keep the same instance when nothing derived changed: replace() is the
        # costly part of a 10,000-workload rebuild, and an unchanged instance
        # lets the Discovery hub skip the field-by-field compare.
        if w.enrolled != enrolled or w.trust_domain != trust_domain:
            built = dataclasses.replace(w, enrolled=enrolled, trust_domain=trust_domain)
        built_workloads.append(built)
        for lk in index_keys:
            lv = built.labels.get(lk)
            if lv is not None:
                by_label[(w.namespace, lk, lv)].append(built)

    vip_owner: dict[str, Service] = {}
    built_services: list[Service] = []
    for _, s in svc_items:
        check_namespace(s, s.namespace, root_ok=False)
        for i, vip in enumerate(s.vips):
            clash: Resource | None = vip_owner.get(vip) or ip_owner.get(vip)
            if clash is not None:
                raise RegistryError(
                    f"{vip} is already used by {name(clash)}",
                    hint="a Service VIP must not be shared with another Service or a pod",
                    where=name(s),
                    field=f"vips[{i}]",
                )
            vip_owner[vip] = s
        endpoints: tuple[str, ...] = ()
        if len(s.selector):
            first_key, first_value = next(iter(s.selector.items()))
            candidates = by_label.get((s.namespace, first_key, first_value), [])
            endpoints = tuple(w.key for w in candidates if w.ready and s.selector.matches(w.labels))
        built_services.append(
            s if s.endpoints == endpoints else dataclasses.replace(s, endpoints=endpoints)
        )

    for p in authz_by_key.values():
        check_namespace(p, p.namespace, root_ok=True)
    for a in peer_by_key.values():
        check_namespace(a, a.namespace, root_ok=True)
    for r in ra_by_key.values():
        check_namespace(r, r.namespace, root_ok=True)

    return RegistryState(
        trust_domain=trust_domain,
        namespaces=tuple(ns_by_name[k] for k in sorted(ns_by_name)),
        workloads=tuple(built_workloads),
        services=tuple(built_services),
        authorization_policies=tuple(authz_by_key[k] for k in sorted(authz_by_key)),
        peer_authentications=tuple(peer_by_key[k] for k in sorted(peer_by_key)),
        request_authentications=tuple(ra_by_key[k] for k in sorted(ra_by_key)),
    )
