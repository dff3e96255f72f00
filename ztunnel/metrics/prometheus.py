"""A small Prometheus registry with text exposition (format 0.0.4).

Only what the ztunnel needs: counters with labels, whose number of distinct
label sets is capped, and gauges read from a callback at scrape time.

Cardinality is bounded on purpose. Labels come from traffic (workload names,
principals), so an attacker or a misbehaving job could otherwise grow memory
without limit. Once a counter holds ``max_label_sets`` label sets, further new
sets are folded into one set whose every label is ``"other"``, and
``veil_metrics_label_sets_dropped_total{metric=...}`` counts how often that
happened, so operators see that a cap was hit.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence

__all__ = ["CONTENT_TYPE", "OVERFLOW_LABEL", "Counter", "Gauge", "Registry", "escape_label_value"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OVERFLOW_LABEL = "other"
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]


def escape_label_value(value: str) -> str:
    """Escapes backslash, double quote and newline, as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _format_labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _check_names(name: str, labels: Sequence[str]) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    for label in labels:
        if not _LABEL_RE.match(label) or label.startswith("__"):
            raise ValueError(f"invalid label name {label!r} on {name}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate label names on {name}")


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

    def value(self, labels: Mapping[str, str] | LabelValues = ()) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def series(self) -> dict[LabelValues, float]:
        with self._lock:
            return dict(self._values)

    def _key(self, labels: Mapping[str, str] | LabelValues) -> LabelValues:
        if isinstance(labels, Mapping):
            if set(labels) != set(self.label_names):
                raise ValueError(
                    f"{self.name} takes labels {list(self.label_names)}, got {sorted(labels)}"
                )
            return tuple(str(labels[n]) for n in self.label_names)
        values = tuple(str(v) for v in labels)
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes {len(self.label_names)} label values")
        return values

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.series().items()):
            lines.append(f"{self.name}{_format_labels(self.label_names, key)} {_format_value(v)}")
        return lines


class Gauge:
    """A gauge family whose samples a callback returns at scrape time."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str],
        read: Callable[[], Mapping[LabelValues, float]],
    ) -> None:
        _check_names(name, label_names)
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self._read = read

    def series(self) -> dict[LabelValues, float]:
        """The samples read now."""
        return dict(self._read())

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        for key, v in sorted(self.series().items()):
            lines.append(f"{self.name}{_format_labels(self.label_names, key)} {_format_value(v)}")
        return lines


class Registry:
    """Named metric families, rendered together in registration order."""

    def __init__(self) -> None:
        self._families: dict[str, Counter | Gauge] = {}
        self._lock = threading.Lock()
        self.dropped = self.counter(
            "veil_metrics_label_sets_dropped_total",
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
            on_overflow=(lambda metric: self.dropped.inc((metric,))) if name != _DROPPED else None,
        )
        self._add(c)
        return c

    def gauge(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str],
        read: Callable[[], Mapping[LabelValues, float]],
    ) -> Gauge:
        g = Gauge(name, help_text, label_names, read)
        self._add(g)
        return g

    def _add(self, family: Counter | Gauge) -> None:
        with self._lock:
            if family.name in self._families:
                raise ValueError(f"metric {family.name} is already registered")
            self._families[family.name] = family

    def get(self, name: str) -> Counter | Gauge | None:
        return self._families.get(name)

    def families(self) -> list[Counter | Gauge]:
        """Every family, in registration order."""
        with self._lock:
            return list(self._families.values())

    def render(self) -> str:
        """The whole registry in the Prometheus text format."""
        with self._lock:
            families = list(self._families.values())
        lines: list[str] = []
        for f in families:
            lines.extend(f.render())
        return "\n".join(lines) + "\n"


_DROPPED = "veil_metrics_label_sets_dropped_total"
