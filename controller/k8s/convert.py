"""Kubernetes objects (as API JSON) to one RegistryState: pure functions.

The watch caches hold raw objects; :func:`convert` turns a snapshot of them into
the same :class:`~controller.api.model.RegistryState` the YAML source builds, by
handing model values to :func:`controller.registry.build_state` (which computes
``Workload.enrolled`` and ``Service.endpoints``) and policy specs to
:mod:`controller.registry.policy`. Nodes cannot tell the two sources apart.

What Kubernetes adds, and how it is mapped:

* Pods become workloads once scheduled (``spec.nodeName``); host-network pods
  (their IP is the node's) and finished pods (Succeeded/Failed, whose IPs are
  being reused) are left out. ``ready`` is phase Running, condition Ready=True
  and not terminating.
* The API is eventually consistent across types, so a snapshot can briefly hold
  what :func:`build_state` rightly refuses from a file: two pods claiming one IP
  (a new pod got the IP of one whose deletion we have not seen yet), or a pod in
  a namespace whose watch event has not arrived. The newest claimant keeps an IP,
  objects in unseen namespaces wait, and each such case is reported in
  ``Conversion.notes`` instead of failing the whole update.
* A Service's named ``targetPort`` is resolved through its EndpointSlices
  (whose ports carry the numbers); a Service without a selector takes its
  endpoints from hand-written EndpointSlices, as kube-proxy does.
* An AuthorizationPolicy, PeerAuthentication or RequestAuthentication whose
  spec does not parse is left out whole (never applied in part); its
  :class:`PolicyVerdict` carries the reason for the status condition.
* The labels ``veil.io/use-waypoint`` and ``veil.io/use-waypoint-namespace``
  on a Namespace stay in its labels (the model reads them from there); on a
  Service they become ``Service.use_waypoint`` and
  ``Service.use_waypoint_namespace``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.api.model import (
    ROOT_NAMESPACE,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    AuthorizationPolicy,
    Labels,
    Namespace,
    PeerAuthentication,
    RegistryState,
    RequestAuthentication,
    Service,
    ServicePort,
    Workload,
)
from controller.api.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    InvalidSpiffeId,
    node_identity,
    workload_identity,
)
from controller.registry import (
    RegistryError,
    build_state,
    parse_authorization_policy,
    parse_peer_authentication,
    parse_request_authentication,
    registry_warnings,
)

from .kinds import (
    AUTHORIZATION_POLICIES,
    PEER_AUTHENTICATIONS,
    REQUEST_AUTHENTICATIONS,
    ResourceKind,
)

__all__ = [
    "Conversion",
    "ConversionCache",
    "PolicyVerdict",
    "convert",
    "namespace_from",
    "service_from",
    "workload_from",
]

Json = Mapping[str, Any]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True)
class PolicyVerdict:
    """Whether one policy object was accepted; ``error`` says why not."""

    kind: ResourceKind
    namespace: str
    name: str
    generation: int
    error: str | None

    @property
    def accepted(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Conversion:
    state: RegistryState
    verdicts: tuple[PolicyVerdict, ...]
    notes: tuple[str, ...]  # objects held back or trimmed, for the log


# API objects are json.loads() output: plain dicts and lists. Checking for dict
# rather than the Mapping ABC keeps a rebuild of thousands of pods cheap.
_EMPTY: dict[str, Any] = {}


def _meta(obj: Json) -> Json:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else _EMPTY


def _map(value: object) -> Json:
    return value if isinstance(value, dict) else _EMPTY


def _list(value: object) -> Sequence[Any]:
    return value if isinstance(value, list) else ()


def _labels(obj: Json) -> Labels:
    raw = _map(_meta(obj).get("labels"))
    return Labels({str(k): str(v) for k, v in raw.items()})


def _created(obj: Json) -> str:
    # RFC 3339 in UTC ("2024-05-01T10:00:00Z") sorts correctly as text.
    return str(_meta(obj).get("creationTimestamp") or "")


def namespace_from(obj: Json) -> Namespace:
    return Namespace(name=str(_meta(obj).get("name")), labels=_labels(obj))


def _pod_ready(pod: Json) -> bool:
    status = _map(pod.get("status"))
    if status.get("phase") != "Running" or _meta(pod).get("deletionTimestamp"):
        return False
    return any(
        _map(c).get("type") == "Ready" and _map(c).get("status") == "True"
        for c in _list(status.get("conditions"))
    )


def _pod_ips(pod: Json) -> tuple[str, ...]:
    status = _map(pod.get("status"))
    ips: list[str] = []
    for entry in _list(status.get("podIPs")):
        ip = _map(entry).get("ip")
        if isinstance(ip, str) and ip and ip not in ips:
            ips.append(ip)
    single = status.get("podIP")
    if not ips and isinstance(single, str) and single:
        ips.append(single)
    return tuple(ips)


def workload_from(pod: Json) -> Workload | None:
    """The workload for a pod, or None when the pod is not part of the mesh's data."""
    meta, spec = _meta(pod), _map(pod.get("spec"))
    node = spec.get("nodeName")
    if not isinstance(node, str) or not node or spec.get("hostNetwork") is True:
        return None
    if _map(pod.get("status")).get("phase") in ("Succeeded", "Failed"):
        return None
    namespace, sa = meta.get("namespace"), spec.get("serviceAccountName") or "default"
    try:
        # The API server guarantees these shapes; a pod that somehow lacks them
        # could not be given an identity or a node certificate anyway.
        if not isinstance(namespace, str) or not isinstance(sa, str):
            return None
        workload_identity(DEFAULT_TRUST_DOMAIN, namespace, sa)
        node_identity(DEFAULT_TRUST_DOMAIN, node)
    except InvalidSpiffeId:
        return None
    return Workload(
        name=str(meta.get("name")),
        namespace=namespace,
        service_account=sa,
        node=node,
        ips=_pod_ips(pod),
        labels=_labels(pod),
        ready=_pod_ready(pod),
    )


def _slice_ports(slices: Iterable[Json]) -> dict[str, int]:
    """Service port name -> target port number, as the EndpointSlice controller resolved it."""
    out: dict[str, int] = {}
    for sl in slices:
        for p in _list(sl.get("ports")):
            p = _map(p)
            port = p.get("port")
            if isinstance(port, int) and p.get("protocol", "TCP") == "TCP":
                out.setdefault(str(p.get("name") or ""), port)
    return out


def service_from(svc: Json, slices: Sequence[Json] = ()) -> tuple[Service | None, list[str]]:
    """The Service model (TCP ports only) and notes about ports that could not be mapped."""
    meta, spec = _meta(svc), _map(svc.get("spec"))
    key = f"{meta.get('namespace')}/{meta.get('name')}"
    if spec.get("type") == "ExternalName":
        return None, []
    raw_ips = _list(spec.get("clusterIPs")) or [spec.get("clusterIP")]
    vips = tuple(ip for ip in raw_ips if isinstance(ip, str) and ip and ip != "None")
    named = _slice_ports(slices)
    notes: list[str] = []
    ports: list[ServicePort] = []
    for raw in _list(spec.get("ports")):
        p = _map(raw)
        if p.get("protocol", "TCP") != "TCP" or not isinstance(p.get("port"), int):
            continue
        name = str(p.get("name") or "")
        target = p.get("targetPort", p["port"])
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if isinstance(target, str):
            resolved = named.get(name)
            if resolved is None:
                notes.append(
                    f"Service {key}: port {p['port']} targets the named port {target!r}, which "
                    "no EndpointSlice resolves yet; the port is left out until one does"
                )
                continue
            target = resolved
        if isinstance(target, int):
            ports.append(ServicePort(port=p["port"], target_port=target, name=name))
    selector = _map(spec.get("selector"))
    return (
        Service(
            name=str(meta.get("name")),
            namespace=str(meta.get("namespace")),
            vips=vips,
            ports=tuple(ports),
            selector=Labels({str(k): str(v) for k, v in selector.items()}),
            use_waypoint=_labels(svc).get(USE_WAYPOINT_LABEL, ""),
            use_waypoint_namespace=_labels(svc).get(USE_WAYPOINT_NAMESPACE_LABEL, ""),
        ),
        notes,
    )


_Policy = AuthorizationPolicy | PeerAuthentication | RequestAuthentication
_Parsed = _Policy | str  # the model, or the refusal
_PARSERS: dict[ResourceKind, Callable[[str, str, Json | None, str], _Policy]] = {
    AUTHORIZATION_POLICIES: parse_authorization_policy,
    PEER_AUTHENTICATIONS: parse_peer_authentication,
    REQUEST_AUTHENTICATIONS: parse_request_authentication,
}


class ConversionCache:
    """Per-object results of the previous :func:`convert`, reused while unchanged.

    An object with the same resourceVersion converts to the same value, so a
    rebuild after one pod changed converts one pod, not all of them. Entries of
    objects that disappeared are dropped at every conversion.
    """

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], tuple[str, Workload | None]] = {}
        self.policies: dict[tuple[str, str, str], tuple[str, _Parsed]] = {}


def _rv(obj: Json) -> str:
    rv = _meta(obj).get("resourceVersion")
    return rv if isinstance(rv, str) else ""


def _claim_order(obj: Json, ready: bool) -> tuple[bool, bool, str]:
    """Who keeps a contested IP: live over terminating, ready, then newest."""
    return (not _meta(obj).get("deletionTimestamp"), ready, _created(obj))


def _parse_one(obj: Json, kind: ResourceKind, name: str, namespace: str) -> _Parsed:
    parse = _PARSERS[kind]
    where = f"{kind.kind} {namespace}/{name}"
    spec = obj.get("spec")
    try:
        if spec is not None and not isinstance(spec, dict):
            raise RegistryError("spec is not an object", where=where)
        return parse(name, namespace, spec, where)
    except RegistryError as e:
        return str(e)


def _parse_policies(
    objs: Iterable[Json],
    kind: ResourceKind,
    old: Mapping[tuple[str, str, str], tuple[str, _Parsed]],
    new: dict[tuple[str, str, str], tuple[str, _Parsed]],
) -> tuple[list[_Policy], list[PolicyVerdict]]:
    accepted: list[_Policy] = []
    verdicts: list[PolicyVerdict] = []
    for obj in objs:
        meta = _meta(obj)
        name, namespace = str(meta.get("name")), str(meta.get("namespace"))
        generation = meta.get("generation")
        gen = generation if isinstance(generation, int) else 0
        key, rv = (kind.plural, namespace, name), _rv(obj)
        hit = old.get(key)
        parsed = hit[1] if hit is not None and rv and hit[0] == rv else None
        if parsed is None:
            parsed = _parse_one(obj, kind, name, namespace)
        new[key] = (rv, parsed)
        if isinstance(parsed, str):
            verdicts.append(PolicyVerdict(kind, namespace, name, gen, parsed))
        else:
            accepted.append(parsed)
            verdicts.append(PolicyVerdict(kind, namespace, name, gen, None))
    return accepted, verdicts


def convert(
    trust_domain: str,
    *,
    namespaces: Iterable[Json],
    pods: Iterable[Json],
    services: Iterable[Json] = (),
    endpoint_slices: Iterable[Json] = (),
    authorization_policies: Iterable[Json] = (),
    peer_authentications: Iterable[Json] = (),
    request_authentications: Iterable[Json] = (),
    cache: ConversionCache | None = None,
) -> Conversion:
    """One RegistryState from a snapshot of the caches; raises RegistryError only on a bug.

    Pass the same ``cache`` to successive calls to convert only what changed.
    """
    cache = cache if cache is not None else ConversionCache()
    old_pods, cache.pods = cache.pods, {}
    old_policies, cache.policies = cache.policies, {}
    notes: list[str] = []
    ns_models = sorted((namespace_from(o) for o in namespaces), key=lambda n: n.name)
    known = {n.name for n in ns_models}

    # Workloads, with contested IPs resolved before build_state sees them.
    candidates: list[tuple[Json, Workload]] = []
    for pod in pods:
        meta = _meta(pod)
        key, rv = (str(meta.get("namespace")), str(meta.get("name"))), _rv(pod)
        hit = old_pods.get(key)
        w = hit[1] if hit is not None and rv and hit[0] == rv else workload_from(pod)
        cache.pods[key] = (rv, w)
        if w is None:
            continue
        if w.namespace not in known:
            notes.append(f"Pod {w.key}: namespace {w.namespace!r} not seen yet; held back")
            continue
        candidates.append((pod, w))
    candidates.sort(key=lambda c: _claim_order(c[0], c[1].ready), reverse=True)
    owner: dict[str, str] = {}
    workloads: list[Workload] = []
    for _pod, w in candidates:
        keep = tuple(ip for ip in w.ips if ip not in owner)
        for ip in w.ips:
            if ip in owner:
                notes.append(f"Pod {w.key}: IP {ip} is also claimed by {owner[ip]}; left out")
            else:
                owner[ip] = w.key
        workloads.append(dataclasses.replace(w, ips=keep) if keep != w.ips else w)

    # Services, grouped with their EndpointSlices.
    slices_of: dict[tuple[str, str], list[Json]] = defaultdict(list)
    for sl in endpoint_slices:
        svc_name = _labels(sl).get(SERVICE_NAME_LABEL)
        if svc_name:
            slices_of[(str(_meta(sl).get("namespace")), svc_name)].append(sl)
    service_models: list[tuple[Json, Service]] = []
    for obj in services:
        meta = _meta(obj)
        slices = slices_of.get((str(meta.get("namespace")), str(meta.get("name"))), [])
        svc, svc_notes = service_from(obj, slices)
        notes.extend(svc_notes)
        if svc is None:
            continue
        if svc.namespace not in known:
            notes.append(f"Service {svc.key}: namespace {svc.namespace!r} not seen yet; held back")
            continue
        service_models.append((obj, svc))
    service_models.sort(key=lambda c: _created(c[0]), reverse=True)
    built_services: list[Service] = []
    for _obj, svc in service_models:
        keep = tuple(ip for ip in svc.vips if ip not in owner)
        for ip in svc.vips:
            if ip in owner:
                notes.append(
                    f"Service {svc.key}: VIP {ip} is also claimed by {owner[ip]}; left out"
                )
            else:
                owner[ip] = svc.key
        built_services.append(dataclasses.replace(svc, vips=keep) if keep != svc.vips else svc)

    authz, authz_verdicts = _parse_policies(
        authorization_policies, AUTHORIZATION_POLICIES, old_policies, cache.policies
    )
    peers, peer_verdicts = _parse_policies(
        peer_authentications, PEER_AUTHENTICATIONS, old_policies, cache.policies
    )
    auths, auth_verdicts = _parse_policies(
        request_authentications, REQUEST_AUTHENTICATIONS, old_policies, cache.policies
    )

    def placed(p: _Policy) -> bool:
        return p.namespace in known or p.namespace == ROOT_NAMESPACE

    state = build_state(
        trust_domain,
        ns_models,
        workloads,
        built_services,
        [p for p in authz if isinstance(p, AuthorizationPolicy) and placed(p)],
        [p for p in peers if isinstance(p, PeerAuthentication) and placed(p)],
        [a for a in auths if isinstance(a, RequestAuthentication) and placed(a)],
    )
    state = _manual_endpoints(state, slices_of)
    # Valid but probably unintended (foreign trust domain, a selector matching
    # nothing): the same warnings the YAML registry logs.
    notes.extend(f"warning: {w}" for w in registry_warnings(state))
    verdicts = authz_verdicts + peer_verdicts + auth_verdicts
    return Conversion(state, tuple(verdicts), tuple(notes))


def _manual_endpoints(
    state: RegistryState, slices_of: Mapping[tuple[str, str], Sequence[Json]]
) -> RegistryState:
    """Endpoints of selector-less Services from their hand-written EndpointSlices."""
    workloads = {w.key: w for w in state.workloads}
    changed = False
    services: list[Service] = []
    for svc in state.services:
        if len(svc.selector) or (svc.namespace, svc.name) not in slices_of:
            services.append(svc)
            continue
        keys: set[str] = set()
        for sl in slices_of[(svc.namespace, svc.name)]:
            for ep in _list(sl.get("endpoints")):
                ep = _map(ep)
                if _map(ep.get("conditions")).get("ready") is False:
                    continue
                ref = _map(ep.get("targetRef"))
                key = f"{ref.get('namespace') or svc.namespace}/{ref.get('name')}"
                if ref.get("kind") == "Pod" and key in workloads and workloads[key].ready:
                    keys.add(key)
        services.append(dataclasses.replace(svc, endpoints=tuple(sorted(keys))))
        changed = True
    return dataclasses.replace(state, services=tuple(services)) if changed else state
