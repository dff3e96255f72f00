"""The controller's Prometheus metrics, served as ``GET /metrics`` on the health endpoint.

Two kinds of series:

* events, counted where they happen: certificates issued (by kind) and refused
  (by reason), registry reload (apply) durations. :class:`ControllerMetrics`
  implements :class:`controller.identity.IssuanceRecorder` for the first;
* state, read at scrape time by :class:`ControllerStateCollector` from what the
  controller already holds (registry generation and last error, Discovery
  watchers, Kubernetes kinds and leadership, CA expiry), so nothing has to be
  kept in step by hand and a scrape sees exactly what ``veil controller
  status`` sees.

Every label value comes from a closed set defined here (kinds, reasons,
Kubernetes kinds the controller watches); a node name or an identity never
becomes a label, so the number of series does not grow with the mesh.
Everything runs on the controller's event loop: the registry and the hub are
loop-owned, and a scrape only reads them.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE",
    "ISSUE_KINDS",
    "REFUSAL_REASONS",
    "ControllerMetrics",
    "ControllerSnapshot",
    "ControllerStateCollector",
    "KindAvailability",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# What was signed: a workload SVID, a node certificate renewed over mTLS, or
# the node certificate of a join.
ISSUE_KINDS = ("workload", "node", "join")

# Why a request was refused. A closed set: anything else is "other".
REFUSAL_REASONS = (
    "invalid_identity",  # not a SPIFFE ID, another trust domain, not a workload
    "not_scheduled",  # node-scoped issuance: no such workload on that node
    "invalid_ttl",
    "invalid_csr",  # unreadable, wrong key, SAN differs from the identity
    "invalid_node_name",
    "unauthenticated",  # join token or Kubernetes token refused
    "auth_unavailable",  # the token could not be checked (TokenReview failed)
    "ca_unavailable",  # the CA itself cannot sign (expired, state unwritable)
    "other",
)

# Reload (apply) times: from a few ms for a small registry to seconds for a
# large cluster's first list.
_RELOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class KindAvailability:
    """One Kubernetes kind the controller watches, as its source reports it."""

    kind: str
    required: bool
    state: str  # "synced", "pending" or "failed"


@dataclass(frozen=True, slots=True)
class ControllerSnapshot:
    """What the state collector reads at scrape time; plain values, no live objects."""

    phase: str = "starting"
    ready: bool = False
    source: str = "yaml"  # "yaml" or "kubernetes"
    registry_generation: int = 0
    registry_loaded_at: float | None = None
    registry_error_at: float | None = None  # set while a rejected update is being ignored
    registry_held: bool = False
    workloads: int = 0
    services: int = 0
    policies: int = 0
    watchers: int = 0
    watch_pending: int = 0
    discovery_version: int = 0
    kinds: tuple[KindAvailability, ...] = ()
    leader: bool | None = None  # None outside Kubernetes mode
    ca_not_after: float | None = None
    trust_domain: str = ""


def _version() -> str:
    try:
        return importlib.metadata.version("veil-mesh")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _gauge(name: str, doc: str, value: float, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels) or None)
    if not labels:
        g.add_metric([], value)
    return g


class ControllerStateCollector(Collector):
    """Turns a :class:`ControllerSnapshot` into gauges at every scrape."""

    def __init__(self, snapshot: Callable[[], ControllerSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        # Unchecked registration: the families depend on the mode (kinds, leader).
        return []

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        info = InfoMetricFamily(
            "veil_controller_build", "Version and trust domain of this controller"
        )
        info.add_metric([], {"version": _version(), "trust_domain": s.trust_domain})
        yield info
        phase = GaugeMetricFamily(
            "veil_controller_phase",
            "1 for the controller's current startup phase",
            labels=["phase"],
        )
        for name in ("starting", "syncing", "serving", "stopping"):
            phase.add_metric([name], 1.0 if s.phase == name else 0.0)
        yield phase
        yield _gauge("veil_controller_ready", "1 when /healthz/ready answers 200", float(s.ready))
        yield _gauge(
            "veil_controller_registry_generation",
            "Number of registry states published since start",
            s.registry_generation,
        )
        yield _gauge(
            "veil_controller_registry_loaded_timestamp_seconds",
            "Unix time of the last published registry state (0: none yet)",
            s.registry_loaded_at or 0.0,
        )
        yield _gauge(
            "veil_controller_registry_error",
            "1 while a rejected registry update is ignored and the previous state serves",
            float(s.registry_error_at is not None),
        )
        yield _gauge(
            "veil_controller_registry_last_error_timestamp_seconds",
            "Unix time of the registry failure being ignored (0: none)",
            s.registry_error_at or 0.0,
        )
        yield _gauge(
            "veil_controller_registry_held",
            "1 while a drastic registry change waits for its files to stay unchanged",
            float(s.registry_held),
        )
        objects = GaugeMetricFamily(
            "veil_controller_registry_objects",
            "Objects in the served registry state",
            labels=["kind"],
        )
        objects.add_metric(["workload"], s.workloads)
        objects.add_metric(["service"], s.services)
        objects.add_metric(["policy"], s.policies)
        yield objects
        yield _gauge(
            "veil_controller_watchers",
            "Nodes holding a Discovery watch stream on this replica",
            s.watchers,
        )
        yield _gauge(
            "veil_controller_watch_pending_changes",
            "Coalesced changes not yet sent, summed over watchers (a slow node grows this)",
            s.watch_pending,
        )
        yield _gauge(
            "veil_controller_discovery_version",
            "Version of the newest state handed to watchers",
            s.discovery_version,
        )
        if s.ca_not_after is not None:
            yield _gauge(
                "veil_controller_ca_expiry_timestamp_seconds",
                "Unix time the active CA certificate expires",
                s.ca_not_after,
            )
        if s.source == "kubernetes":
            available = GaugeMetricFamily(
                "veil_controller_kubernetes_kind_available",
                "1 when the kind's list and watch are synced; "
                "required kinds gate readiness, optional ones only degrade it",
                labels=["kind", "required"],
            )
            for k in s.kinds:
                available.add_metric([k.kind, str(k.required).lower()], float(k.state == "synced"))
            yield available
        if s.leader is not None:
            yield _gauge(
                "veil_controller_leader",
                "1 on the replica that holds the Lease and writes status and the CA Secret",
                float(s.leader),
            )


class ControllerMetrics:
    """The controller's metric registry; one per process (tests make their own)."""

    def __init__(self, snapshot: Callable[[], ControllerSnapshot] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._issued = Counter(
            "veil_controller_certificates_issued",
            "Certificates signed, by kind (workload SVID, node renewal, node join)",
            ["kind"],
            registry=self.registry,
        )
        self._refused = Counter(
            "veil_controller_certificate_refusals",
            "Certificate and join requests refused, by operation and reason",
            ["operation", "reason"],
            registry=self.registry,
        )
        self._reload = Histogram(
            "veil_controller_registry_reload_duration_seconds",
            "Time to apply a new registry state: diff against the previous one and "
            "hand the changes to every watcher",
            buckets=_RELOAD_BUCKETS,
            registry=self.registry,
        )
        # Series exist from the first scrape, so rate() and absent() work at once.
        for kind in ISSUE_KINDS:
            self._issued.labels(kind)
        for op in ("certificate", "join"):
            for reason in REFUSAL_REASONS:
                self._refused.labels(op, reason)
        self._snapshot = snapshot or ControllerSnapshot
        self.registry.register(ControllerStateCollector(lambda: self._snapshot()))

    def set_snapshot(self, snapshot: Callable[[], ControllerSnapshot]) -> None:
        """Where scrape-time state comes from (the server wires it once started)."""
        self._snapshot = snapshot

    # -- controller.identity.IssuanceRecorder --------------------------------

    def issued(self, kind: str) -> None:
        self._issued.labels(kind if kind in ISSUE_KINDS else "workload").inc()

    def refused(self, operation: str, reason: str) -> None:
        op = operation if operation in ("certificate", "join") else "certificate"
        self._refused.labels(op, reason if reason in REFUSAL_REASONS else "other").inc()

    # -- registry ------------------------------------------------------------

    def observe_reload(self, seconds: float) -> None:
        self._reload.observe(seconds)

    def timed(self, apply: Callable[[], object]) -> None:
        """Runs ``apply`` and records how long it took, even when it raises."""
        t0 = time.perf_counter()
        try:
            apply()
        finally:
            self.observe_reload(time.perf_counter() - t0)

    def exposition(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)
