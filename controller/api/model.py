"""Frozen internal types for everything the controller distributes.

These are the types the registry produces, the Discovery stream carries (after
conversion in :mod:`controller.api.wire`), and the nodes consume. They hold no
protobuf and no mutable containers, so a snapshot can be shared between tasks
and threads without copying.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, workload_identity

__all__ = [
    "AMBIENT",
    "DATAPLANE_MODE_LABEL",
    "OPT_OUT",
    "ROOT_NAMESPACE",
    "USE_WAYPOINT_LABEL",
    "USE_WAYPOINT_NAMESPACE_LABEL",
    "WAYPOINT_LABEL",
    "AuthorizationPolicy",
    "Condition",
    "JoinResult",
    "JwtHeader",
    "JwtRule",
    "Labels",
    "Namespace",
    "Operation",
    "PeerAuthMode",
    "PeerAuthentication",
    "PolicyAction",
    "RegistryState",
    "RequestAuthentication",
    "Resource",
    "ResourceType",
    "Rule",
    "Service",
    "ServicePort",
    "Source",
    "TargetRef",
    "TrustBundle",
    "WatchUpdate",
    "Workload",
    "resource_key",
    "resource_type",
]

DATAPLANE_MODE_LABEL = "veil.io/dataplane-mode"
AMBIENT = "ambient"
OPT_OUT = "none"
# Policies in the root namespace apply to every workload in the mesh.
ROOT_NAMESPACE = "veil-system"
# On a Namespace or a Service: send its traffic through the waypoint of that
# name, in the namespace USE_WAYPOINT_NAMESPACE_LABEL names (default: the
# object's own namespace, as Istio's istio.io/use-waypoint-namespace).
# See docs/waypoint.md.
USE_WAYPOINT_LABEL = "veil.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "veil.io/use-waypoint-namespace"
# On a Workload: this workload is a replica of the waypoint of that name.
WAYPOINT_LABEL = "veil.io/waypoint"


class Labels(Mapping[str, str]):
    """An immutable, hashable string-to-string mapping (Kubernetes labels)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items: tuple[tuple[str, str], ...] = tuple(sorted((str(k), str(v)) for k, v in pairs))

    def __getitem__(self, key: str) -> str:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({dict(self._items)!r})"

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when every key/value here is present in ``labels`` (a selector match)."""
        return all(labels.get(k) == v for k, v in self._items)


class ResourceType(enum.IntEnum):
    """Resource kinds on the Discovery stream (numbers equal the proto enum)."""

    NAMESPACE = 1
    WORKLOAD = 2
    SERVICE = 3
    AUTHORIZATION_POLICY = 4
    PEER_AUTHENTICATION = 5
    REQUEST_AUTHENTICATION = 6


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Labels = field(default_factory=Labels)

    @property
    def key(self) -> str:
        return self.name

    @property
    def enrolled(self) -> bool:
        return self.labels.get(DATAPLANE_MODE_LABEL) == AMBIENT

    @property
    def use_waypoint(self) -> str:
        """The waypoint this namespace's traffic goes through ("" for none)."""
        return self.labels.get(USE_WAYPOINT_LABEL, "")

    @property
    def waypoint(self) -> tuple[str, str] | None:
        """``(namespace, name)`` of the waypoint this namespace uses, None for none."""
        name = self.use_waypoint
        if not name:
            return None
        return (self.labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or self.name, name)


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod (or VM) the mesh knows about.

    ``identity`` is derived once, when the workload is built: a workload whose
    trust domain, namespace or service account cannot form a SPIFFE ID is
    refused right there (:class:`~controller.api.spiffe.InvalidSpiffeId`), so
    every workload that exists has a ready identity and no reader re-parses it.
    """

    name: str
    namespace: str
    service_account: str
    node: str
    ips: tuple[str, ...]
    labels: Labels = field(default_factory=Labels)
    # Computed by the controller: namespace is ambient and the pod is not opted out.
    enrolled: bool = False
    ready: bool = True
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    # Derived from the three fields above; never passed in, never compared.
    identity: SpiffeId = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # workload_identity is memoised, so equal workloads share one SpiffeId.
        ident = workload_identity(self.trust_domain, self.namespace, self.service_account)
        object.__setattr__(self, "identity", ident)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def waypoint(self) -> str:
        """The waypoint this workload is a replica of ("" for an ordinary workload)."""
        return self.labels.get(WAYPOINT_LABEL, "")


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    vips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    selector: Labels = field(default_factory=Labels)
    endpoints: tuple[str, ...] = ()  # workload keys "<ns>/<name>"
    # From the Service's label veil.io/use-waypoint ("" for none); the
    # namespace's label applies when this is empty.
    use_waypoint: str = ""
    # From veil.io/use-waypoint-namespace: where that waypoint lives ("" for
    # the Service's own namespace). Meaningless without use_waypoint.
    use_waypoint_namespace: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def waypoint(self) -> tuple[str, str] | None:
        """``(namespace, name)`` of the waypoint this Service's own label names, else None."""
        if not self.use_waypoint:
            return None
        return (self.use_waypoint_namespace or self.namespace, self.use_waypoint)


class PolicyAction(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True, slots=True)
class Source:
    """One ``rules[].from[].source``: all non-empty fields must match (AND)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    # L7: "<iss>/<sub>" of a verified JWT (RequestAuthentication); a waypoint
    # evaluates these, a ztunnel cannot (see node.policy.match).
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """One ``rules[].to[].operation``; all non-empty fields must match (AND).

    ``ports`` are L4; hosts, methods and paths are L7 (waypoint only).
    """

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``rules[].when[]`` entry: ``key`` (``request.auth.claims[role]``,
    ``request.headers[x-user]``, ``source.namespace``...) must have one of
    ``values`` (if any) and none of ``not_values``."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule matches when any ``sources`` entry and any ``operations`` entry
    match, and every ``conditions`` entry holds; an empty list matches everything."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class TargetRef:
    """A policy attachment (``targetRefs[]``): ``kind`` is ``Gateway`` (Veil's
    waypoint, by name) or ``Service``, in the policy's namespace."""

    kind: str
    name: str
    group: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: PolicyAction
    rules: tuple[Rule, ...] = ()
    # None: the whole namespace (or the whole mesh in ROOT_NAMESPACE).
    selector: Labels | None = None
    # Non-empty: the policy is attached to these waypoints or services and is
    # enforced by the waypoint only, never by a ztunnel (Istio's targetRefs).
    target_refs: tuple[TargetRef, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class JwtHeader:
    """Where a token is read from: header ``name``, after ``prefix`` ("Bearer ")."""

    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One ``jwtRules[]`` entry of a RequestAuthentication.

    ``jwks`` is an inline JWKS document (JSON text); ``jwks_uri`` is fetched by
    the waypoint. No ``from_headers``: ``Authorization: Bearer <token>``.
    """

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""
    jwks_uri: str = ""
    from_headers: tuple[JwtHeader, ...] = ()
    forward_original_token: bool = False


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    """Which JWTs a waypoint accepts for a workload, waypoint or service.

    Attached like an AuthorizationPolicy: by ``selector`` (None: the whole
    namespace) or by ``target_refs``.
    """

    name: str
    namespace: str
    jwt_rules: tuple[JwtRule, ...] = ()
    selector: Labels | None = None
    target_refs: tuple[TargetRef, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PeerAuthMode(enum.Enum):
    UNSET = "UNSET"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    name: str
    namespace: str
    mode: PeerAuthMode
    selector: Labels | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class TrustBundle:
    trust_domain: str
    roots: tuple[bytes, ...]  # PEM certificates


Resource = (
    Namespace
    | Workload
    | Service
    | AuthorizationPolicy
    | PeerAuthentication
    | RequestAuthentication
)

_TYPE_OF: dict[type, ResourceType] = {
    Namespace: ResourceType.NAMESPACE,
    Workload: ResourceType.WORKLOAD,
    Service: ResourceType.SERVICE,
    AuthorizationPolicy: ResourceType.AUTHORIZATION_POLICY,
    PeerAuthentication: ResourceType.PEER_AUTHENTICATION,
    RequestAuthentication: ResourceType.REQUEST_AUTHENTICATION,
}


def resource_type(resource: Resource) -> ResourceType:
    return _TYPE_OF[type(resource)]


def resource_key(resource: Resource) -> tuple[ResourceType, str]:
    return _TYPE_OF[type(resource)], resource.key


@dataclass(frozen=True, slots=True)
class RegistryState:
    """One consistent view of everything the registry holds.

    Produced whole by a registry source (YAML file or Kubernetes) and published
    to the Discovery hub, which diffs it against the previous state.
    """

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    namespaces: tuple[Namespace, ...] = ()
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()

    def resources(self) -> Iterator[Resource]:
        yield from self.namespaces
        yield from self.workloads
        yield from self.services
        yield from self.authorization_policies
        yield from self.peer_authentications
        yield from self.request_authentications

    def workloads_on(self, node: str) -> tuple[Workload, ...]:
        return tuple(w for w in self.workloads if w.node == node)


@dataclass(frozen=True, slots=True)
class WatchUpdate:
    """One Discovery message, converted from the wire."""

    epoch: str
    version: int
    snapshot: bool
    upserts: tuple[Resource, ...] = ()
    removals: tuple[tuple[ResourceType, str], ...] = ()
    trust_bundle: TrustBundle | None = None


@dataclass(frozen=True, slots=True)
class JoinResult:
    """What ``Identity.JoinNode`` answers: the node's certificate and the trust bundle."""

    node: str
    cert_chain: tuple[bytes, ...]  # PEM, leaf first
    trust_bundle: tuple[bytes, ...]  # PEM roots
    trust_domain: str
    controller_address: str = ""  # the mTLS listener, HOST:PORT ("" from older controllers)
