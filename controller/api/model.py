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
    "AuthorizationPolicy",
    "JoinResult",
    "Labels",
    "Namespace",
    "Operation",
    "PeerAuthMode",
    "PeerAuthentication",
    "PolicyAction",
    "RegistryState",
    "Resource",
    "ResourceType",
    "Rule",
    "Service",
    "ServicePort",
    "Source",
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

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


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


@dataclass(frozen=True, slots=True)
class Operation:
    """One ``rules[].to[].operation``."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule matches when any ``sources`` entry and any ``operations`` entry
    match; an empty list matches everything."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: PolicyAction
    rules: tuple[Rule, ...] = ()
    # None: the whole namespace (or the whole mesh in ROOT_NAMESPACE).
    selector: Labels | None = None

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


Resource = Namespace | Workload | Service | AuthorizationPolicy | PeerAuthentication

_TYPE_OF: dict[type, ResourceType] = {
    Namespace: ResourceType.NAMESPACE,
    Workload: ResourceType.WORKLOAD,
    Service: ResourceType.SERVICE,
    AuthorizationPolicy: ResourceType.AUTHORIZATION_POLICY,
    PeerAuthentication: ResourceType.PEER_AUTHENTICATION,
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

    def resources(self) -> Iterator[Resource]:
        yield from self.namespaces
        yield from self.workloads
        yield from self.services
        yield from self.authorization_policies
        yield from self.peer_authentications

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
