"""Metrics read from the ztunnel's components at scrape time.

Each ``register_*`` function adds families to a :class:`~.prometheus.Registry`
that read what a component already holds, so nothing has to be kept in step
by hand:

* the HBONE client pool: pooled connections, idle ones, open streams
  (per worker; the supervisor sums them);
* certificates: the expiry of each identity's SVID as a Unix timestamp, for
  alerts such as ``veil_ztunnel_certificate_expiry_timestamp_seconds - time()
  < 3600``. Bounded: past ``max_identities`` only the soonest to expire are
  shown (those are the ones an alert needs);
* the controller channel: reconnections and failed RPCs by gRPC status;
* the process: prometheus_client's process collector (CPU, memory, open file
  descriptors; this process only: with several workers, the supervisor) and
  ``veil_build_info{version, python}``.

The components are described by small protocols, so this module imports
neither the pool, the certificate manager nor the channel.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .prometheus import Registry

__all__ = [
    "BuildInfoCollector",
    "add_process_metrics",
    "build_version",
    "register_certificate_expiry",
    "register_controller_metrics",
    "register_pool_gauges",
]

DEFAULT_MAX_IDENTITIES = 1000

LabelValues = tuple[str, ...]


class PooledConnection(Protocol):
    @property
    def streams(self) -> int: ...
    @property
    def going_away(self) -> bool: ...


class _Certificate(Protocol):
    @property
    def not_after(self) -> datetime: ...


class CertificateState(Protocol):
    @property
    def identity(self) -> object: ...
    @property
    def certificate(self) -> _Certificate | None: ...


class ControllerCounters(Protocol):
    @property
    def reconnects(self) -> int: ...
    @property
    def errors(self) -> Mapping[str, int]: ...
    @property
    def reachable(self) -> bool: ...


def build_version() -> str:
    try:
        return importlib.metadata.version("veil-mesh")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def register_pool_gauges(
    registry: Registry, connections: Callable[[], Sequence[PooledConnection]]
) -> None:
    """HBONE client pool gauges; ``connections`` is the pool's ``connections``."""

    def total() -> dict[LabelValues, float]:
        conns = connections()
        return {
            ("open",): float(sum(1 for c in conns if not c.going_away)),
            ("draining",): float(sum(1 for c in conns if c.going_away)),
        }

    registry.gauge(
        "veil_ztunnel_hbone_pool_connections",
        "Pooled outbound HBONE connections to peers; draining ones got or sent GOAWAY.",
        ("state",),
        total,
    )
    registry.gauge(
        "veil_ztunnel_hbone_pool_idle_connections",
        "Pooled outbound HBONE connections carrying no stream (released after the idle timeout).",
        (),
        lambda: {(): float(sum(1 for c in connections() if c.streams == 0))},
    )
    registry.gauge(
        "veil_ztunnel_hbone_pool_streams",
        "Open CONNECT streams on pooled outbound HBONE connections.",
        (),
        lambda: {(): float(sum(c.streams for c in connections()))},
    )


def expiry_samples(
    states: Sequence[CertificateState], max_identities: int = DEFAULT_MAX_IDENTITIES
) -> dict[LabelValues, float]:
    """Identity -> not_after (Unix seconds), the ``max_identities`` soonest (pure)."""
    held = sorted(
        (s.certificate.not_after.timestamp(), str(s.identity))
        for s in states
        if s.certificate is not None
    )
    return {(ident,): when for when, ident in held[:max_identities]}


def register_certificate_expiry(
    registry: Registry,
    statuses: Callable[[], Sequence[CertificateState]],
    max_identities: int = DEFAULT_MAX_IDENTITIES,
) -> None:
    registry.gauge(
        "veil_ztunnel_certificate_expiry_timestamp_seconds",
        "Unix time the workload certificate of each identity expires "
        f"(the {max_identities} soonest).",
        ("identity",),
        lambda: expiry_samples(statuses(), max_identities),
        max_label_sets=max_identities,
    )


def register_controller_metrics(registry: Registry, channel: ControllerCounters) -> None:
    registry.counter_func(
        "veil_ztunnel_controller_reconnects_total",
        "Times the controller became reachable again after an outage.",
        (),
        lambda: {(): float(channel.reconnects)},
    )
    registry.counter_func(
        "veil_ztunnel_controller_errors_total",
        "Failed controller RPCs (watch and certificate requests), by gRPC status.",
        ("code",),
        lambda: {(code,): float(n) for code, n in dict(channel.errors).items()},
    )
    registry.gauge(
        "veil_ztunnel_controller_reachable",
        "1 while the controller answers RPCs, 0 during an outage.",
        (),
        lambda: {(): float(channel.reachable)},
    )


class BuildInfoCollector(Collector):
    """``veil_build_info{version, python} 1``."""

    def __init__(self, version: str | None = None) -> None:
        self._labels = [version or build_version(), platform.python_version()]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "veil_build_info",
            "Version of this ztunnel and of the Python running it; always 1.",
            labels=["version", "python"],
        )
        info.add_metric(self._labels, 1.0)
        yield info


def add_process_metrics(registry: Registry) -> None:
    """CPU, memory and file descriptors of this process, and the build info."""
    # registry=None: the collector must not join prometheus_client's global
    # registry; tests and workers each make their own.
    registry.add_collector(ProcessCollector(registry=None))
    registry.add_collector(BuildInfoCollector())
