"""Telemetry: a bounded Prometheus registry, Istio TCP metrics and the access log."""

from .prometheus import CONTENT_TYPE, OVERFLOW_LABEL, Counter, Gauge, Registry, escape_label_value
from .traffic import (
    ACCESS_LOGGER,
    LABEL_NAMES,
    ConnectionLabels,
    ConnectionReport,
    Reporter,
    TrafficMetrics,
    canonical_name,
    write_access_log,
)

__all__ = [
    "ACCESS_LOGGER",
    "CONTENT_TYPE",
    "LABEL_NAMES",
    "OVERFLOW_LABEL",
    "ConnectionLabels",
    "ConnectionReport",
    "Counter",
    "Gauge",
    "Registry",
    "Reporter",
    "TrafficMetrics",
    "canonical_name",
    "escape_label_value",
    "write_access_log",
]
