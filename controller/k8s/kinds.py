"""The Kubernetes resource types Veil reads or writes, and their REST paths.

One frozen :class:`ResourceKind` per type keeps the API group, version and plural
in one place; :mod:`controller.k8s.client` builds every URL from it, so the list,
watch, get and status paths of a type can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "AUTHORIZATION_POLICIES",
    "CONFIG_MAPS",
    "CRD_GROUP",
    "CRD_VERSION",
    "ENDPOINT_SLICES",
    "LEASES",
    "NAMESPACES",
    "OPTIONAL_KINDS",
    "PEER_AUTHENTICATIONS",
    "PODS",
    "REQUEST_AUTHENTICATIONS",
    "REQUIRED_KINDS",
    "SECRETS",
    "SERVICES",
    "TOKEN_REVIEWS",
    "WATCHED_KINDS",
    "ResourceKind",
    "understood_versions",
]

CRD_GROUP = "security.veil.io"
CRD_VERSION = "v1"


@dataclass(frozen=True, slots=True)
class ResourceKind:
    """A REST resource: ``/api/v1/pods`` or ``/apis/<group>/<version>/<plural>``."""

    kind: str
    plural: str
    group: str = ""  # "" is the core group (/api/v1)
    version: str = "v1"
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def _prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def collection_path(self, namespace: str | None = None) -> str:
        """The list/watch/create URL: all namespaces when ``namespace`` is None."""
        if self.namespaced and namespace is not None:
            return f"{self._prefix()}/namespaces/{quote(namespace, safe='')}/{self.plural}"
        return f"{self._prefix()}/{self.plural}"

    def object_path(self, namespace: str | None, name: str, subresource: str = "") -> str:
        if self.namespaced and not namespace:
            raise ValueError(f"{self.kind} is namespaced; a namespace is required")
        path = (
            f"{self.collection_path(namespace if self.namespaced else None)}/{quote(name, safe='')}"
        )
        return f"{path}/{subresource}" if subresource else path


NAMESPACES = ResourceKind("Namespace", "namespaces", namespaced=False)
PODS = ResourceKind("Pod", "pods")
SERVICES = ResourceKind("Service", "services")
ENDPOINT_SLICES = ResourceKind("EndpointSlice", "endpointslices", group="discovery.k8s.io")
AUTHORIZATION_POLICIES = ResourceKind(
    "AuthorizationPolicy", "authorizationpolicies", group=CRD_GROUP, version=CRD_VERSION
)
PEER_AUTHENTICATIONS = ResourceKind(
    "PeerAuthentication", "peerauthentications", group=CRD_GROUP, version=CRD_VERSION
)
# JWT rules for the waypoint (docs/waypoint.md).
REQUEST_AUTHENTICATIONS = ResourceKind(
    "RequestAuthentication", "requestauthentications", group=CRD_GROUP, version=CRD_VERSION
)
LEASES = ResourceKind("Lease", "leases", group="coordination.k8s.io")
SECRETS = ResourceKind("Secret", "secrets")
CONFIG_MAPS = ResourceKind("ConfigMap", "configmaps")
TOKEN_REVIEWS = ResourceKind(
    "TokenReview", "tokenreviews", group="authentication.k8s.io", namespaced=False
)

# What the registry source lists and watches, in the order it starts them.
# ServiceAccounts are not among them: a workload's identity comes from its pod's
# spec.serviceAccountName, and nothing Veil distributes is derived from the
# ServiceAccount objects, so watching them would cost API load and RBAC for nothing.
WATCHED_KINDS: tuple[ResourceKind, ...] = (
    NAMESPACES,
    PODS,
    SERVICES,
    ENDPOINT_SLICES,
    AUTHORIZATION_POLICIES,
    PEER_AUTHENTICATIONS,
    REQUEST_AUTHENTICATIONS,
)

# Kinds without which the controller does not serve: identities come from pods
# and namespaces, and serving without the policies would hand nodes a mesh with
# no authorization (fail closed). Services and EndpointSlices only fill in
# service VIPs and ports; without them a node still routes pod-to-pod traffic
# correctly, so the controller may start degraded (VIPs empty until they list).
# RequestAuthentications are required too: without them a waypoint sees no
# request principal or claims, and a DENY policy on a claim would stop matching
# (it would allow what its author denied).
REQUIRED_KINDS: frozenset[ResourceKind] = frozenset(
    {NAMESPACES, PODS, AUTHORIZATION_POLICIES, PEER_AUTHENTICATIONS, REQUEST_AUTHENTICATIONS}
)
OPTIONAL_KINDS: frozenset[ResourceKind] = frozenset(WATCHED_KINDS) - REQUIRED_KINDS

# The versions Veil can read, newest first. The source asks the API server which
# of them it serves (API discovery) and reads the first one offered, as client-go
# based controllers do: EndpointSlice is discovery.k8s.io/v1 from Kubernetes 1.21,
# v1beta1 before. The fields Veil reads (endpoints[].targetRef/conditions.ready,
# ports, the service-name label) are the same in both, so the registry does not
# depend on the version read.
_VERSIONS: dict[ResourceKind, tuple[str, ...]] = {ENDPOINT_SLICES: ("v1", "v1beta1")}


def understood_versions(kind: ResourceKind) -> tuple[str, ...]:
    """The versions of ``kind`` Veil can read, newest first."""
    return _VERSIONS.get(kind, (kind.version,))
