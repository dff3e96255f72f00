"""The waypoint's request metrics, Istio-named, in the Prometheus text format.

``istio_requests_total`` and the ``istio_request_duration_milliseconds``
histogram, labelled by response code, protocol, and source and destination
workload and principal. The number of label sets of each family is capped;
past the cap observations fold into one ``other`` set (counted in
``veil_metrics_label_sets_dropped_total``).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ztunnel.metrics import Registry
from ztunnel.metrics.prometheus import escape_label_value

__all__ = ["LABELS", "Histogram", "RequestLabels", "RequestMetrics"]

# Istio's default buckets for request durations, in milliseconds.
BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
LABELS = (
    "reporter",
    "request_protocol",
    "response_code",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_service",
    "destination_workload",
    "destination_principal",
)


@dataclass(frozen=True, slots=True)
class RequestLabels:
    request_protocol: str
    response_code: int
    source_workload: str
    source_workload_namespace: str
    source_principal: str
    destination_service: str
    destination_workload: str
    destination_principal: str

    def values(self) -> tuple[str, ...]:
        return (
            "waypoint",
            self.request_protocol,
            str(self.response_code),
            self.source_workload,
            self.source_workload_namespace,
            self.source_principal,
            self.destination_service,
            self.destination_workload,
            self.destination_principal,
        )


class Histogram:
    """A histogram family with bounded label sets."""

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str], buckets: Sequence[float], cap: int
    ) -> None:
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)
        self.buckets = tuple(buckets)
        self.cap = cap
        self.dropped = 0
        self._series: dict[tuple[str, ...], list[float]] = {}  # counts..., +Inf, sum
        self._lock = threading.Lock()

    def observe(self, values: tuple[str, ...], v: float) -> None:
        with self._lock:
            series = self._series.get(values)
            if series is None:
                if len(self._series) >= self.cap:
                    self.dropped += 1
                    values = tuple("other" for _ in self.labels)
                series = self._series.setdefault(values, [0.0] * (len(self.buckets) + 2))
            series[bisect.bisect_left(self.buckets, v)] += 1
            series[-1] += v

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            base = ",".join(
                f'{n}="{escape_label_value(v)}"' for n, v in zip(self.labels, key, strict=True)
            )
            total = 0.0
            for bound, count in zip((*self.buckets, float("inf")), series[:-1], strict=True):
                total += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f'{self.name}_bucket{{{base},le="{le}"}} {total:g}')
            out.append(f"{self.name}_sum{{{base}}} {series[-1]:g}")
            out.append(f"{self.name}_count{{{base}}} {total:g}")
        return out


class RequestMetrics:
    def __init__(self, registry: Registry, *, max_label_sets: int = 2000) -> None:
        self.registry = registry
        self.requests = registry.counter(
            "istio_requests_total",
            "Requests the waypoint answered or forwarded, by response code.",
            LABELS,
            max_label_sets=max_label_sets,
        )
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Time from the request head to the end of the response, in milliseconds.",
            LABELS,
            BUCKETS,
            max_label_sets,
        )

    def record(self, labels: RequestLabels, duration_ms: float) -> None:
        values = labels.values()
        self.requests.inc(values)
        self.duration.observe(values, duration_ms)

    def render(self) -> str:
        return self.registry.render().rstrip("\n") + "\n" + "\n".join(self.duration.render()) + "\n"
