"""Per-connection telemetry: Istio-compatible TCP metrics and the access log.

The proxy calls :meth:`TrafficMetrics.connection_opened` when it accepts a
connection and :meth:`TrafficMetrics.connection_closed` with a
:class:`ConnectionReport` when it ends. The latter updates the counters and
writes one structured JSON line to the ``veil.access`` logger.

Byte directions follow Istio: ``received`` counts bytes from the source
(client) toward the destination, ``sent`` counts bytes from the destination
back to the source. Workload labels use the workload's canonical name (the
``service.istio.io/canonical-name``, ``app.kubernetes.io/name`` or ``app``
label, else the pod name) so a Deployment's pods share one series, as in Istio.
:mod:`.labels` holds every label rule (app, canonical service and revision,
destination service, connection security policy).

Denies this ztunnel decided (policy, peer authentication, a policy re-check)
are also counted in ``veil_ztunnel_policy_denies_total{policy, reason}``;
``reason`` is one of the closed set :data:`DENY_REASONS`, so free text never
becomes a label. A deny answered by a peer (401 on outbound HBONE) is the
peer's decision and is counted there, not twice.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from controller.api.model import Service, Workload
from controller.api.spiffe import SpiffeId
from node.state import Snapshot

from .access_sink import AccessLogSink
from .labels import (
    UNKNOWN,
    InboundServices,
    app_name,
    canonical_name,
    canonical_revision,
    security_policy,
    service_host,
)
from .prometheus import Counter, Registry

__all__ = [
    "ACCESS_LOGGER",
    "DENY_LABEL_NAMES",
    "DENY_REASONS",
    "LABEL_NAMES",
    "ConnectionLabels",
    "ConnectionReport",
    "Reporter",
    "TrafficMetrics",
    "access_log_line",
    "canonical_name",
    "deny_reason",
    "write_access_log",
]

ACCESS_LOGGER = "veil.access"
LABEL_NAMES = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
DENY_LABEL_NAMES = ("policy", "reason")
# Why this ztunnel denied: a closed set, mapped from the decision's text.
DENY_REASONS = (
    "deny_policy",  # a DENY policy matched
    "invalid_policy",  # a DENY policy that cannot be evaluated denies everything
    "no_allow_match",  # ALLOW policies apply and none matched
    "peer_authentication_strict",  # plaintext to a STRICT workload
    "unknown_source",  # the forwarded client is unknown or not the peer identity
    "unknown_destination",
    "policy_recheck",  # a live connection closed after a policy change
    "other",
)
_POLICY_DENIED_FLAG = "RBAC"  # the proxy's response flag for authorization denies
_PEER_DECIDED_ROUTES = frozenset({"hbone", "waypoint"})  # outbound: the peer enforces
_DENY_CAP = 1000  # (policy, reason) sets: policies are few, written by operators

access_log = logging.getLogger(ACCESS_LOGGER)


class Reporter(enum.Enum):
    """Which end of the tunnel reports: the client's ztunnel or the server's."""

    SOURCE = "source"
    DESTINATION = "destination"


@dataclass(frozen=True, slots=True)
class ConnectionLabels:
    """The label values of one connection's ``istio_tcp_*`` series."""

    reporter: Reporter
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = UNKNOWN

    @classmethod
    def of(
        cls,
        reporter: Reporter,
        source: Workload | None,
        source_principal: SpiffeId | None,
        destination: Workload | None,
        destination_principal: SpiffeId | None,
        response_flags: str = "-",
        *,
        service: Service | None = None,
        route: str | None = None,
    ) -> ConnectionLabels:
        """``route`` (``ConnectionInfo.route``) gives the security policy;
        ``service`` is the destination Service, when one is known.

        Memoised: a connection derives its labels twice (open, close) and the
        connections between two workloads all share them, so deriving them
        each time cost ~20 canonical-name lookups per connection in profiles.
        Workloads and Services are keyed by identity (the snapshot's objects;
        the cache holds them, so an id cannot be reused while cached), SPIFFE
        IDs by value.
        """
        key = (
            reporter,
            id(source),
            source_principal,
            id(destination),
            destination_principal,
            response_flags,
            id(service),
            route,
        )
        hit = _labels_memo.get(key)
        if hit is not None and hit[1] is source and hit[2] is destination and hit[3] is service:
            return hit[0]
        labels = cls._derive(
            reporter,
            source,
            source_principal,
            destination,
            destination_principal,
            response_flags,
            service=service,
            route=route,
        )
        if len(_labels_memo) >= _LABELS_MEMO_MAX:
            _labels_memo.clear()  # snapshots replaced the objects; start over
        _labels_memo[key] = (labels, source, destination, service)
        return labels

    @classmethod
    def _derive(
        cls,
        reporter: Reporter,
        source: Workload | None,
        source_principal: SpiffeId | None,
        destination: Workload | None,
        destination_principal: SpiffeId | None,
        response_flags: str,
        *,
        service: Service | None,
        route: str | None,
    ) -> ConnectionLabels:
        return cls(
            reporter=reporter,
            source_workload=canonical_name(source) if source else UNKNOWN,
            source_workload_namespace=source.namespace if source else UNKNOWN,
            source_principal=str(source_principal) if source_principal else UNKNOWN,
            source_app=app_name(source) if source else UNKNOWN,
            source_canonical_service=canonical_name(source) if source else UNKNOWN,
            source_canonical_revision=canonical_revision(source) if source else UNKNOWN,
            destination_workload=canonical_name(destination) if destination else UNKNOWN,
            destination_workload_namespace=destination.namespace if destination else UNKNOWN,
            destination_principal=str(destination_principal) if destination_principal else UNKNOWN,
            destination_app=app_name(destination) if destination else UNKNOWN,
            destination_canonical_service=canonical_name(destination) if destination else UNKNOWN,
            destination_canonical_revision=(
                canonical_revision(destination) if destination else UNKNOWN
            ),
            destination_service=service_host(service) if service else UNKNOWN,
            destination_service_name=service.name if service else UNKNOWN,
            destination_service_namespace=service.namespace if service else UNKNOWN,
            response_flags=response_flags or "-",
            connection_security_policy=security_policy(route) if route else UNKNOWN,
        )

    def values(self) -> tuple[str, ...]:
        """The values in :data:`LABEL_NAMES` order."""
        return (
            self.reporter.value,
            self.source_workload,
            self.source_workload_namespace,
            self.source_principal,
            self.source_app,
            self.source_canonical_service,
            self.source_canonical_revision,
            self.destination_workload,
            self.destination_workload_namespace,
            self.destination_principal,
            self.destination_app,
            self.destination_canonical_service,
            self.destination_canonical_revision,
            self.destination_service,
            self.destination_service_name,
            self.destination_service_namespace,
            self.request_protocol,
            self.response_flags,
            self.connection_security_policy,
        )


# ConnectionLabels.of memo: (labels, and the objects its key names by id).
_LABELS_MEMO_MAX = 4096
_labels_memo: dict[
    tuple[object, ...],
    tuple[ConnectionLabels, Workload | None, Workload | None, Service | None],
] = {}


def _addr(a: tuple[str, int] | None) -> str | None:
    if a is None:
        return None
    host, port = a
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ConnectionReport:
    """Everything known about one finished connection."""

    reporter: Reporter
    src_addr: tuple[str, int] | None
    dst_addr: tuple[str, int] | None
    src_workload: Workload | None = None
    dst_workload: Workload | None = None
    src_principal: SpiffeId | None = None
    dst_principal: SpiffeId | None = None
    received_bytes: int = 0  # source -> destination
    sent_bytes: int = 0  # destination -> source
    duration: float = 0.0  # seconds
    verdict: str = "allow"  # "allow" or "deny"
    reason: str = ""
    policy: str | None = None
    error: str | None = None
    response_flags: str = "-"
    direction: str | None = None  # "outbound", "inbound", "inbound_plaintext"
    route: str | None = None  # Route.kind on outbound
    service: Service | None = None  # the destination Service, when known

    @property
    def labels(self) -> ConnectionLabels:
        return ConnectionLabels.of(
            self.reporter,
            self.src_workload,
            self.src_principal,
            self.dst_workload,
            self.dst_principal,
            self.response_flags,
            service=self.service,
            route=self.route,
        )

    @property
    def decided_here(self) -> bool:
        """A policy deny this ztunnel decided (not one a peer answered)."""
        if self.verdict != "deny" or self.response_flags != _POLICY_DENIED_FLAG:
            return False
        return not (self.direction == "outbound" and self.route in _PEER_DECIDED_ROUTES)

    def to_json(self) -> dict[str, object]:
        return {
            "event": "connection_closed",
            "reporter": self.reporter.value,
            "direction": self.direction,
            "route": self.route,
            "src": _addr(self.src_addr),
            "dst": _addr(self.dst_addr),
            "src_workload": self.src_workload.key if self.src_workload else None,
            "dst_workload": self.dst_workload.key if self.dst_workload else None,
            "src_identity": str(self.src_principal) if self.src_principal else None,
            "dst_identity": str(self.dst_principal) if self.dst_principal else None,
            "bytes_received": self.received_bytes,
            "bytes_sent": self.sent_bytes,
            "duration_ms": round(self.duration * 1000, 3),
            "verdict": self.verdict,
            "reason": self.reason,
            "policy": self.policy,
            "error": self.error,
            "response_flags": self.response_flags,
        }


class TrafficMetrics:
    """The four ``istio_tcp_*`` counters, plus the access log."""

    def __init__(self, registry: Registry | None = None, *, max_label_sets: int = 10_000) -> None:
        self.registry = registry if registry is not None else Registry()

        def counter(name: str, help_text: str) -> Counter:
            return self.registry.counter(
                name, help_text, LABEL_NAMES, max_label_sets=max_label_sets
            )

        self.opened = counter(
            "istio_tcp_connections_opened_total", "TCP connections opened through the ztunnel."
        )
        self.closed = counter(
            "istio_tcp_connections_closed_total", "TCP connections closed through the ztunnel."
        )
        self.sent = counter(
            "istio_tcp_sent_bytes_total",
            "Bytes sent from the destination back to the source of TCP connections.",
        )
        self.received = counter(
            "istio_tcp_received_bytes_total",
            "Bytes received from the source of TCP connections, toward the destination.",
        )
        self.denies = self.registry.counter(
            "veil_ztunnel_policy_denies_total",
            "Connections this ztunnel denied (authorization policy, peer authentication, "
            "policy re-check), by deciding policy ('none' without one) and reason.",
            DENY_LABEL_NAMES,
            max_label_sets=min(max_label_sets, _DENY_CAP),
        )
        for reason in DENY_REASONS:
            self.denies.touch(("none", reason))
        self._inbound_services = InboundServices()
        # Called with every denied connection (the admin API's deny feed).
        self.deny_listeners: list[Callable[[ConnectionReport], None]] = []

    def inbound_service(self, snapshot: Snapshot, destination: Workload | None) -> Service | None:
        """The destination Service of an inbound connection (see :mod:`.labels`)."""
        return self._inbound_services.lookup(snapshot, destination)

    def connection_opened(self, labels: ConnectionLabels) -> None:
        self.opened.inc(labels.values())

    def add_bytes(self, labels: ConnectionLabels, received: int, sent: int) -> None:
        """For long-lived connections: count bytes before the connection ends."""
        if received:
            self.received.inc(labels.values(), received)
        if sent:
            self.sent.inc(labels.values(), sent)

    def connection_closed(self, report: ConnectionReport, *, bytes_counted: bool = False) -> None:
        """Counts the close and its bytes (unless already counted with
        :meth:`add_bytes`), and writes the access log line."""
        values = report.labels.values()
        self.closed.inc(values)
        if not bytes_counted:
            if report.received_bytes:
                self.received.inc(values, report.received_bytes)
            if report.sent_bytes:
                self.sent.inc(values, report.sent_bytes)
        if report.decided_here:
            self.denies.inc((report.policy or "none", deny_reason(report.reason)))
        write_access_log(report)
        if report.verdict == "deny":
            for listener in self.deny_listeners:
                listener(report)

    def render(self) -> str:
        return self.registry.render()


def deny_reason(text: str) -> str:
    """The :data:`DENY_REASONS` entry for a decision's reason text."""
    if text.startswith("policy re-check"):
        return "policy_recheck"
    if "DENY policy" in text and "invalid" in text:
        return "invalid_policy"
    if text.startswith("denied by DENY policy"):
        return "deny_policy"
    if text.startswith("no ALLOW policy matched"):
        return "no_allow_match"
    if "is STRICT" in text:
        return "peer_authentication_strict"
    if text.startswith("forwarded client"):
        return "unknown_source"
    if "not a known workload" in text or "left the mesh" in text:
        return "unknown_destination"
    return "other"


def _utc_now() -> str:
    """RFC 3339 UTC with microseconds, as ``datetime.strftime`` would give it;
    the seconds part is formatted once per second (it showed in profiles)."""
    now = time.time()
    sec = int(now)
    global _time_prefix
    if _time_prefix[0] != sec:
        _time_prefix = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_time_prefix[1]}.{min(int((now - sec) * 1e6), 999_999):06d}Z"


_time_prefix: tuple[int, str] = (-1, "")


def access_log_line(report: ConnectionReport, at: datetime | None = None) -> str:
    """The access log line: one JSON object, nothing before or after it, so a
    log shipper parses it as is. ``time`` is RFC 3339 UTC (microseconds)."""
    when = _utc_now() if at is None else at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps({"time": when, **report.to_json()}, separators=(",", ":"), sort_keys=False)


def write_access_log(report: ConnectionReport) -> None:
    """One JSON line on the ``veil.access`` logger (level INFO). The process
    gives that logger a handler that writes the message alone (no prefix)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    line = access_log_line(report)
    # The ztunnel's own set-up (one AccessLogSink, no propagation, no logger
    # filters) takes the line as is: building a LogRecord (caller lookup,
    # pid, thread name) was a quarter of the access log's cost per connection.
    handlers = access_log.handlers
    if (
        len(handlers) == 1
        and not access_log.propagate
        and not access_log.filters
        and isinstance(handlers[0], AccessLogSink)
        and handlers[0].offer(line)
    ):
        return
    access_log.info(line)
