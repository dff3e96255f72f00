"""Telemetry: bounded metric families on prometheus_client, Istio TCP metrics, the access log."""

from .labels import UNKNOWN, app_name, canonical_name, canonical_revision, security_policy
from .prometheus import (
    CONTENT_TYPE,
    OVERFLOW_LABEL,
    Counter,
    CounterFunc,
    Gauge,
    Registry,
    escape_label_value,
)
from .traffic import (
    ACCESS_LOGGER,
    DENY_REASONS,
    LABEL_NAMES,
    ConnectionLabels,
    ConnectionReport,
    Reporter,
    TrafficMetrics,
    deny_reason,
    write_access_log,
)

__all__ = [
    "ACCESS_LOGGER",
    "CONTENT_TYPE",
    "DENY_REASONS",
    "LABEL_NAMES",
    "OVERFLOW_LABEL",
    "UNKNOWN",
    "ConnectionLabels",
    "ConnectionReport",
    "Counter",
    "CounterFunc",
    "Gauge",
    "Registry",
    "Reporter",
    "TrafficMetrics",
    "app_name",
    "canonical_name",
    "canonical_revision",
    "deny_reason",
    "escape_label_value",
    "security_policy",
    "write_access_log",
]
