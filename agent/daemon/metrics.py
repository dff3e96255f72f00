"""The agent's Prometheus metrics: BPF drops by reason and pod, enrolment, reconcile passes.

Served as ``GET /metrics`` on a TCP port of its own (default
``127.0.0.1:15022``, ``--metrics-address`` / ``VEIL_AGENT_METRICS_ADDRESS``,
``off`` disables it); the DaemonSet binds it to the node's IP so Prometheus
can scrape it (docs/kubernetes.md says why).

Two halves:

* :func:`drop_view` is pure: given the pinned ``pods`` and ``counters`` rows
  (read through the typed wrapper :class:`agent.bpf.maps.DataplaneMaps`) and a
  lookup from pod address to ``(namespace, name)``, it returns the per-pod
  series, capped at ``max_pods`` pods. :class:`DropTotals` keeps the node
  totals monotonic although a pod's row is deleted with the pod (a sum over the
  rows present would fall, and ``rate()`` would read that as a reset and
  report a spike);
* :class:`DataplaneCollector` renders a :class:`DataplaneSample` at scrape
  time, and :class:`AgentMetrics` holds the reconcile histogram and error
  counter the daemon updates after each pass.

Cardinality: reasons come from the closed :class:`~agent.bpf.codes.DropReason`
enum; pods only appear once they have dropped something, and beyond
``max_pods`` of them (chosen by name, so the same pods keep their series from
one scrape to the next) the rest are summed into
``workload_namespace="other", workload="other"``, and
``veil_agent_metrics_pods_folded`` says how many. The node totals count
every pod whatever the cap.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from agent.bpf.codes import DropReason
from agent.bpf.maps import DataplaneMaps, PodCounters, PodEntry
from node.dataplane import AGENT_METRICS_PORT
from node.state import Snapshot

__all__ = [
    "DEFAULT_MAX_POD_SERIES",
    "DEFAULT_METRICS_ADDRESS",
    "OVERFLOW",
    "AgentMetrics",
    "DataplaneCollector",
    "DataplaneSample",
    "DropTotals",
    "DropView",
    "MetricsServer",
    "drop_view",
    "parse_metrics_address",
    "read_sample",
]

log = logging.getLogger("veil.agent")

DEFAULT_METRICS_ADDRESS = ("127.0.0.1", AGENT_METRICS_PORT)
# One node rarely runs more than ~110 pods (the kubelet's default maximum);
# 256 leaves room for dense nodes and still bounds a scrape.
DEFAULT_MAX_POD_SERIES = 256
OVERFLOW = "other"
UNKNOWN = "unknown"  # a counters row whose pod the registry does not (yet) name

_RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

PodName = tuple[str, str]  # (namespace, name)


def parse_metrics_address(text: str) -> tuple[str, int] | None:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` (port 15022) or ``off`` (None)."""
    text = text.strip()
    if text == "off":
        return None
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not HOST:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ValueError(f"{text!r} has no host (use 127.0.0.1:{AGENT_METRICS_PORT} or off)")
    if not port_text:
        return host, AGENT_METRICS_PORT
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{port_text!r} is not a TCP port")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class DropView:
    """Drops by reason and pod (capped)."""

    pods: Mapping[PodName, Mapping[DropReason, int]]
    folded: int = 0  # pods summed into (other, other)


def drop_view(
    entries: Iterable[PodEntry],
    counters: Mapping[int, PodCounters],
    owner: Callable[[IPv4Address], PodName | None],
    max_pods: int = DEFAULT_MAX_POD_SERIES,
) -> DropView:
    """Names each counters row by its pod and caps the per-pod series (pure)."""
    by_ifindex = {e.ifindex: e for e in entries}
    pods: dict[PodName, dict[DropReason, int]] = {}
    for ifindex, row in counters.items():
        drops = {r: n for r, n in row.drops.items() if n}
        if not drops:
            continue
        entry = by_ifindex.get(ifindex)
        name = owner(entry.ip) if entry is not None else None
        key = name if name is not None else (UNKNOWN, f"ifindex-{ifindex}")
        merged = pods.setdefault(key, {})
        for reason, n in drops.items():
            merged[reason] = merged.get(reason, 0) + n
    kept = sorted(pods)[:max_pods]
    out: dict[PodName, Mapping[DropReason, int]] = {k: pods[k] for k in kept}
    rest = sorted(pods)[max_pods:]
    if rest:
        other: dict[DropReason, int] = {}
        for k in rest:
            for reason, n in pods[k].items():
                other[reason] = other.get(reason, 0) + n
        out[(OVERFLOW, OVERFLOW)] = other
    return DropView(pods=out, folded=len(rest))


class DropTotals:
    """Node-wide drops by reason since the agent started, never decreasing.

    Each scrape adds what every counters row gained since the previous one. A
    row seen smaller than before was deleted and created again (a new pod on a
    reused ifindex), so all of it is new. Drops a pod made between the last
    scrape and its deletion are not seen: the row is gone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[int, DropReason], int] = {}
        self._totals: dict[DropReason, int] = {}

    def update(self, counters: Mapping[int, PodCounters]) -> Mapping[DropReason, int]:
        with self._lock:
            current = {
                (ifindex, reason): n
                for ifindex, row in counters.items()
                for reason, n in row.drops.items()
            }
            for key, n in current.items():
                before = self._last.get(key, 0)
                gained = n - before if n >= before else n
                if gained:
                    self._totals[key[1]] = self._totals.get(key[1], 0) + gained
            self._last = current
            return dict(self._totals)


@dataclass(frozen=True, slots=True)
class DataplaneSample:
    """What one scrape reads from the maps and the registry view."""

    node_drops: Mapping[DropReason, int] = field(default_factory=dict)
    drops: DropView = field(default_factory=lambda: DropView({}))
    pod_entries: int = 0
    enrolled: int = 0
    outbound_redirected: int = 0
    inbound_redirected: int = 0
    registry_synced: bool = False
    local_workloads: int = 0
    pending: int = 0  # pods waiting for their veth


def read_sample(
    maps: DataplaneMaps,
    snapshot: Snapshot | None,
    totals: DropTotals,
    *,
    pending: int = 0,
    max_pods: int = DEFAULT_MAX_POD_SERIES,
) -> DataplaneSample:
    """One scrape's view: the pinned maps, named by the registry snapshot (worker thread)."""
    entries = maps.pods()
    counters = maps.all_counters()

    def owner(ip: IPv4Address) -> PodName | None:
        w = snapshot.workload_by_ip(str(ip)) if snapshot is not None else None
        return (w.namespace, w.name) if w is not None else None

    return DataplaneSample(
        node_drops=totals.update(counters),
        drops=drop_view(entries, counters, owner, max_pods),
        pod_entries=len(entries),
        enrolled=sum(1 for e in entries if e.enrolled),
        outbound_redirected=sum(c.outbound_redirected for c in counters.values()),
        inbound_redirected=sum(c.inbound_redirected for c in counters.values()),
        registry_synced=bool(snapshot is not None and snapshot.synced),
        local_workloads=len(snapshot.local_workloads) if snapshot is not None else 0,
        pending=pending,
    )


class DataplaneCollector(Collector):
    """Renders a fresh :class:`DataplaneSample` at every scrape."""

    def __init__(self, sample: Callable[[], DataplaneSample]) -> None:
        self._sample = sample

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self._sample()
        node = CounterMetricFamily(
            "veil_agent_bpf_drops",
            "Packets the BPF programs dropped on this node since the agent started, by reason",
            labels=["reason"],
        )
        for reason in DropReason:
            if reason is not DropReason.NONE:
                node.add_metric([reason.label], s.node_drops.get(reason, 0))
        yield node
        per_pod = CounterMetricFamily(
            "veil_agent_bpf_pod_drops",
            "Packets dropped by reason and pod; only pods that dropped something, "
            "capped (see veil_agent_metrics_pods_folded)",
            # Not "namespace"/"pod": Prometheus puts the scraped target's own
            # pod there (the node pod), and would rename ours exported_*.
            labels=["reason", "workload_namespace", "workload"],
        )
        for (namespace, pod), drops in sorted(s.drops.pods.items()):
            for reason, n in sorted(drops.items()):
                per_pod.add_metric([reason.label, namespace, pod], n)
        yield per_pod
        folded = GaugeMetricFamily(
            "veil_agent_metrics_pods_folded",
            'Pods whose drops are summed into workload="other" because of the series cap',
        )
        folded.add_metric([], s.drops.folded)
        yield folded
        redirected = CounterMetricFamily(
            "veil_agent_bpf_redirected",
            "Connections steered to the ztunnel, by direction (pods present now)",
            labels=["direction"],
        )
        redirected.add_metric(["outbound"], s.outbound_redirected)
        redirected.add_metric(["inbound"], s.inbound_redirected)
        yield redirected
        for name, doc, value in (
            (
                "veil_agent_enrolled_pods",
                "Pods whose traffic is steered through the mesh",
                s.enrolled,
            ),
            (
                "veil_agent_pod_entries",
                "Local pods known to the BPF maps, enrolled or not",
                s.pod_entries,
            ),
            (
                "veil_agent_local_workloads",
                "This node's workloads in the registry view",
                s.local_workloads,
            ),
            ("veil_agent_pending_pods", "Pods waiting for their veth before enrolment", s.pending),
            (
                "veil_agent_registry_synced",
                "1 once the registry has been received",
                float(s.registry_synced),
            ),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g


class AgentMetrics:
    """The agent's registry: reconcile events plus the scrape-time data-plane view."""

    def __init__(self, sample: Callable[[], DataplaneSample] = DataplaneSample) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._duration = Histogram(
            "veil_agent_reconcile_duration_seconds",
            "Time of one reconcile pass against the kernel, by scope "
            "(full: every local pod; partial: what a registry change touched)",
            ["scope"],
            buckets=_RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self._errors = Counter(
            "veil_agent_reconcile_errors",
            "Reconcile failures: a pod action that failed, or a whole pass",
            ["kind"],
            registry=self.registry,
        )
        for scope in ("full", "partial"):
            self._duration.labels(scope)
        for kind in ("action", "pass"):
            self._errors.labels(kind)
        self.registry.register(DataplaneCollector(lambda: sample()))

    def reconciled(self, *, full: bool, seconds: float, failed_actions: int) -> None:
        self._duration.labels("full" if full else "partial").observe(seconds)
        if failed_actions:
            self._errors.labels("action").inc(failed_actions)

    def pass_failed(self) -> None:
        self._errors.labels("pass").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` over HTTP; collection runs in a thread (map reads are syscalls)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _scrape(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, port: int) -> bool:
        """Binds; False (logged, not fatal) when the address is unusable."""
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        # SO_REUSEPORT: during a DaemonSet surge the new pod's agent binds next
        # to the old one's instead of running without metrics.
        site = web.TCPSite(runner, host, port, reuse_port=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            log.warning(
                "metrics endpoint not started: cannot listen on %s:%d: %s; "
                "pick another with --metrics-address (VEIL_AGENT_METRICS_ADDRESS)",
                host,
                port,
                e.strerror or e,
            )
            return False
        self._runner = runner
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
