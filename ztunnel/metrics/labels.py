"""How the Istio labels of the TCP metrics are derived from workloads and services.

Pure functions, one per rule, so that dashboards written for Istio (Kiali,
Istio's Grafana boards) read the same values from Veil. The rules:

* ``*_app``: the label ``app.kubernetes.io/name``, else ``app``, else
  ``unknown``;
* ``*_canonical_service``: ``service.istio.io/canonical-name``, else the
  app (as above), else the workload's name;
* ``*_canonical_revision``: ``service.istio.io/canonical-revision``, else
  ``app.kubernetes.io/version``, else ``version``, else ``latest`` (Istio's
  default);
* ``*_workload``: the canonical service (one series per Deployment rather
  than per pod: a pod name would make a series per pod);
* ``destination_service``: the Service's host name
  ``<name>.<namespace>.svc.cluster.local``, with ``destination_service_name``
  and ``destination_service_namespace``. On the source side it is the Service
  whose VIP the client dialled; on the destination side the client's VIP is
  not visible (the CONNECT names the pod), so it is the one Service that
  selects the destination workload, and ``unknown`` when none or several do
  (as Istio's ztunnel guesses it);
* ``connection_security_policy``: ``mutual_tls`` for HBONE (either side, and
  via a waypoint) and for same-node traffic (both identities are held by
  this ztunnel and the bytes never leave the node, which is what Istio's
  ztunnel reports for its in-process same-node path); ``none`` for
  passthrough and plaintext inbound; ``unknown`` for a connection refused
  before it was routed;
* ``request_protocol`` is always ``tcp``.
"""

from __future__ import annotations

from controller.api.model import Service, Workload
from node.state import Snapshot

__all__ = [
    "CLUSTER_DOMAIN",
    "MUTUAL_TLS",
    "NO_TLS",
    "UNKNOWN",
    "InboundServices",
    "app_name",
    "canonical_name",
    "canonical_revision",
    "inbound_service",
    "security_policy",
    "service_host",
]

UNKNOWN = "unknown"
MUTUAL_TLS = "mutual_tls"
NO_TLS = "none"
# Service host names use Kubernetes' default cluster domain, as Istio's do.
CLUSTER_DOMAIN = "cluster.local"

_APP_LABELS = ("app.kubernetes.io/name", "app")
_CANONICAL_NAME = "service.istio.io/canonical-name"
_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
_DEFAULT_REVISION = "latest"

# Routes (ConnectionInfo.route) whose bytes travel inside mutual TLS, or that
# never leave the node between two identities this ztunnel holds.
_SECURE_ROUTES = frozenset({"hbone", "waypoint", "same_node", "inbound"})
_PLAIN_ROUTES = frozenset({"passthrough", "inbound_plaintext"})


def app_name(workload: Workload) -> str:
    for label in _APP_LABELS:
        value = workload.labels.get(label)
        if value:
            return value
    return UNKNOWN


def canonical_name(workload: Workload) -> str:
    value = workload.labels.get(_CANONICAL_NAME)
    if value:
        return value
    app = app_name(workload)
    return app if app != UNKNOWN else workload.name


def canonical_revision(workload: Workload) -> str:
    for label in _REVISION_LABELS:
        value = workload.labels.get(label)
        if value:
            return value
    return _DEFAULT_REVISION


def service_host(service: Service) -> str:
    return f"{service.name}.{service.namespace}.svc.{CLUSTER_DOMAIN}"


def security_policy(route: str) -> str:
    """``connection_security_policy`` for a connection that took ``route``."""
    if route in _SECURE_ROUTES:
        return MUTUAL_TLS
    if route in _PLAIN_ROUTES:
        return NO_TLS
    return UNKNOWN


def inbound_service(snapshot: Snapshot, destination: Workload | None) -> Service | None:
    """The Service an inbound connection most likely came through: the only
    one that has ``destination`` as an endpoint, else None."""
    if destination is None:
        return None
    return InboundServices.build(snapshot).get(destination.key)


class InboundServices:
    """Workload key -> its only Service, derived once per snapshot.

    The inbound path asks for every connection; scanning every Service each
    time would cost the data path O(endpoints). The index is rebuilt the
    first time it is asked about a new snapshot and kept until the next.
    """

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._index: dict[str, Service] = {}

    @staticmethod
    def build(snapshot: Snapshot) -> dict[str, Service]:
        index: dict[str, Service] = {}
        ambiguous: set[str] = set()
        for service in snapshot.services.values():
            for key in service.endpoints:
                if key in index and index[key] is not service:
                    ambiguous.add(key)
                index[key] = service
        for key in ambiguous:
            del index[key]
        return index

    def lookup(self, snapshot: Snapshot, destination: Workload | None) -> Service | None:
        if destination is None:
            return None
        if snapshot is not self._snapshot:
            self._index = self.build(snapshot)
            self._snapshot = snapshot
        return self._index.get(destination.key)
