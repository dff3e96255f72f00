"""The ztunnel's metric registry: bounded label stores exposed through prometheus_client.

prometheus_client renders the text format and brings the process collector;
what it lacks is a bound on the number of label sets. Labels here come from
traffic (workload names, principals, services), so an attacker or a
misbehaving job could otherwise grow memory and every scrape without limit.
So the families live in stores of our own, and one custom collector
(:class:`BoundedCollector`) turns them into prometheus_client families at
scrape time:

* :class:`Counter`: counted where events happen. Once it holds
  ``max_label_sets`` label sets, further new sets are folded into one set
  whose every label is ``"other"``, and
  ``veil_metrics_label_sets_dropped_total{metric=...}`` counts the
  observations folded, so an operator sees that a cap was hit;
* :class:`Gauge` and :class:`CounterFunc`: read from a callback at scrape
  time (state the process already holds), folded the same way past the cap.

:meth:`Registry.families` hands the stores to the multi-worker merge
(:mod:`.aggregate`), which sums them across processes and renders the sum
with :meth:`Registry.render_families`, through the same path. Collectors
that are not bounded stores (process metrics, build info) are added with
:meth:`Registry.add_collector`; they describe this process only and are not
exported to a merge.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE",
    "DROPPED_METRIC",
    "OVERFLOW_LABEL",
    "BoundedCollector",
    "Counter",
    "CounterFunc",
    "FamilyData",
    "Gauge",
    "Registry",
    "escape_label_value",
    "fold",
    "to_metric",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
OVERFLOW_LABEL = "other"
DROPPED_METRIC = "veil_metrics_label_sets_dropped_total"
# A label value longer than this is cut: values come from the network and
# the registry (names, principals), and one huge value is as costly as many.
MAX_LABEL_VALUE = 256
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]


def escape_label_value(value: str) -> str:
    """Escapes backslash, double quote and newline, as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _check_names(name: str, labels: Sequence[str]) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    for label in labels:
        if not _LABEL_RE.match(label) or label.startswith("__"):
            raise ValueError(f"invalid label name {label!r} on {name}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate label names on {name}")


def fold(
    samples: Mapping[LabelValues, float], width: int, max_label_sets: int
) -> tuple[dict[LabelValues, float], int]:
    """``samples`` with the sets beyond the first ``max_label_sets`` (in sorted
    order, so the same sets survive every scrape) summed into the ``other``
    set; also returns how many sets were folded."""
    if len(samples) <= max_label_sets:
        return dict(samples), 0
    overflow = tuple(OVERFLOW_LABEL for _ in range(width))
    out: dict[LabelValues, float] = {}
    folded = 0
    for key in sorted(samples):
        target = key
        if key not in out and len(out) >= max_label_sets:
            target, folded = overflow, folded + 1
        out[target] = out.get(target, 0.0) + samples[key]
    return out, folded


class FamilyData(Protocol):
    """The shape a family is rendered and merged from."""

    @property
    def name(self) -> str: ...
    @property
    def help(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def labels(self) -> tuple[str, ...]: ...
    @property
    def samples(self) -> Mapping[LabelValues, float]: ...


def to_metric(
    name: str,
    help_text: str,
    kind: str,
    labels: Sequence[str],
    samples: Mapping[LabelValues, float],
) -> Metric:
    """A prometheus_client family holding ``samples`` (sorted, for stable output)."""
    family: CounterMetricFamily | GaugeMetricFamily
    if kind == "counter":
        family = CounterMetricFamily(name, help_text, labels=list(labels))
    else:
        family = GaugeMetricFamily(name, help_text, labels=list(labels))
    for key, value in sorted(samples.items()):
        family.add_metric(list(key), value)
    return family


class Counter:
    """A monotonically increasing counter family with bounded label sets."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        max_label_sets: int = 10_000,
        on_overflow: Callable[[str], None] | None = None,
    ) -> None:
        _check_names(name, label_names)
        if max_label_sets < 1:
            raise ValueError("max_label_sets must be at least 1")
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self.max_label_sets = max_label_sets
        self._on_overflow = on_overflow
        self._values: dict[LabelValues, float] = {}
        self._lock = threading.Lock()
        self._overflow = tuple(OVERFLOW_LABEL for _ in self.label_names)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.label_names

    @property
    def samples(self) -> dict[LabelValues, float]:
        return self.series()

    def inc(self, labels: Mapping[str, str] | LabelValues = (), amount: float = 1.0) -> None:
        """Adds ``amount`` (>= 0) to the series ``labels`` (a mapping or values in order)."""
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up (got {amount})")
        key = self._key(labels)
        overflowed = False
        with self._lock:
            if key not in self._values and len(self._values) >= self.max_label_sets:
                key = self._overflow
                overflowed = True
            self._values[key] = self._values.get(key, 0.0) + amount
        if overflowed and self._on_overflow is not None:
            self._on_overflow(self.name)

    def touch(self, labels: Mapping[str, str] | LabelValues) -> None:
        """Creates the series at 0 (if the cap allows), so ``rate()`` and
        ``absent()`` work before the first event."""
        key = self._key(labels)
        with self._lock:
            if key not in self._values and len(self._values) < self.max_label_sets:
                self._values[key] = 0.0

    def value(self, labels: Mapping[str, str] | LabelValues = ()) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def series(self) -> dict[LabelValues, float]:
        with self._lock:
            return dict(self._values)

    def _key(self, labels: Mapping[str, str] | LabelValues) -> LabelValues:
        # Fast path: a tuple equal to a series already held was validated when
        # that series was made (only tuples of str equal one). The proxy passes
        # the same 19 label values on every event of a connection.
        if type(labels) is tuple and labels in self._values:
            return labels
        if isinstance(labels, Mapping):
            if set(labels) != set(self.label_names):
                raise ValueError(
                    f"{self.name} takes labels {list(self.label_names)}, got {sorted(labels)}"
                )
            values = tuple(str(labels[n]) for n in self.label_names)
        else:
            values = tuple(str(v) for v in labels)
            if len(values) != len(self.label_names):
                raise ValueError(f"{self.name} takes {len(self.label_names)} label values")
        return tuple(v[:MAX_LABEL_VALUE] for v in values)


class Gauge:
    """A gauge family whose samples a callback returns at scrape time."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str],
        read: Callable[[], Mapping[LabelValues, float]],
        *,
        max_label_sets: int = 10_000,
    ) -> None:
        _check_names(name, label_names)
        if max_label_sets < 1:
            raise ValueError("max_label_sets must be at least 1")
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self.max_label_sets = max_label_sets
        self._read = read

    @property
    def labels(self) -> tuple[str, ...]:
        return self.label_names

    @property
    def samples(self) -> dict[LabelValues, float]:
        return self.series()

    def series(self) -> dict[LabelValues, float]:
        """The samples read now, capped like a counter's label sets."""
        width = len(self.label_names)
        raw = {
            tuple(str(v)[:MAX_LABEL_VALUE] for v in k): float(v)
            for k, v in self._read().items()
            if len(k) == width
        }
        return fold(raw, width, self.max_label_sets)[0]


class CounterFunc(Gauge):
    """A counter family read from a callback (a total another component keeps)."""

    kind = "counter"


Family = Counter | Gauge


class _StaticFamilies(Collector):
    def __init__(self, families: Iterable[FamilyData]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        for f in self._families:
            yield to_metric(f.name, f.help, f.kind, f.labels, f.samples)


class BoundedCollector(Collector):
    """The custom collector: renders a :class:`Registry`'s bounded stores."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def describe(self) -> list[Metric]:
        # Unchecked registration: the families are added after the collector.
        return []

    def collect(self) -> Iterator[Metric]:
        for f in self._registry.families():
            yield to_metric(f.name, f.help, f.kind, f.label_names, f.series())


class Registry:
    """Bounded metric families in registration order, plus extra collectors."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._extras: list[Collector] = []
        self._lock = threading.Lock()
        self.collectors = CollectorRegistry(auto_describe=False)
        self.collectors.register(BoundedCollector(self))
        self.dropped = self.counter(
            DROPPED_METRIC,
            "Observations folded into the 'other' label set because a metric hit its label-set cap.",
            ("metric",),
        )

    def counter(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        max_label_sets: int = 10_000,
    ) -> Counter:
        c = Counter(
            name,
            help_text,
            label_names,
            max_label_sets=max_label_sets,
            on_overflow=self._count_drop if name != DROPPED_METRIC else None,
        )
        self._add(c)
        return c

    def gauge(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str],
        read: Callable[[], Mapping[LabelValues, float]],
        *,
        max_label_sets: int = 10_000,
    ) -> Gauge:
        g = Gauge(name, help_text, label_names, read, max_label_sets=max_label_sets)
        self._add(g)
        return g

    def counter_func(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str],
        read: Callable[[], Mapping[LabelValues, float]],
    ) -> CounterFunc:
        c = CounterFunc(name, help_text, label_names, read)
        self._add(c)
        return c

    def add_collector(self, collector: Collector) -> None:
        """A prometheus_client collector of this process alone (not merged)."""
        with self._lock:
            self._extras.append(collector)
        self.collectors.register(collector)

    def _count_drop(self, metric: str) -> None:
        self.dropped.inc((metric,))

    def _add(self, family: Family) -> None:
        with self._lock:
            if family.name in self._families:
                raise ValueError(f"metric {family.name} is already registered")
            self._families[family.name] = family

    def get(self, name: str) -> Family | None:
        return self._families.get(name)

    def families(self) -> list[Family]:
        """Every bounded family, in registration order."""
        with self._lock:
            return list(self._families.values())

    def render(self) -> str:
        """The whole registry in the Prometheus text format."""
        return generate_latest(self.collectors).decode()

    def render_families(self, families: Iterable[FamilyData]) -> str:
        """``families`` (a merge of several processes' stores) in place of this
        registry's own stores, with this registry's extra collectors."""
        target = CollectorRegistry(auto_describe=False)
        target.register(_StaticFamilies(families))
        with self._lock:
            extras = list(self._extras)
        for c in extras:
            target.register(c)
        return generate_latest(target).decode()
