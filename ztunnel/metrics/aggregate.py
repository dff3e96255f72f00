"""Metrics of several worker processes, summed into one exposition.

A multi-core ztunnel has one registry per worker (the traffic counters and
the active-connections gauge live where the connections are) plus the
supervisor's own (state and certificate gauges). :func:`export_registry`
turns a registry into plain data a worker can send; :class:`MetricsMerger`
sums such exports per family and label set and renders the Prometheus text.

Label-set caps still hold after the merge: each worker caps its own counters,
and the merger folds label sets beyond ``max_label_sets`` into the ``other``
set, so N workers cannot multiply a family's cardinality by N.

Counters of a worker that exited are kept (:meth:`MetricsMerger.retire`), so
a restarted worker does not make a summed counter go backwards.

This module depends only on the exported shape (``name``, ``help``,
``kind``, ``labels``, ``samples``), not on the registry's internals. The
sum is rendered by prometheus_client, through the registry's own path
(:meth:`~.prometheus.Registry.render_families`), so the supervisor's
process and build-info collectors appear once, next to the summed families.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .prometheus import OVERFLOW_LABEL, Registry

__all__ = ["ExportedFamily", "MetricsMerger", "export_registry", "parse_export"]

LabelValues = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ExportedFamily:
    name: str
    help: str
    kind: str  # "counter" or "gauge"
    labels: tuple[str, ...]
    samples: Mapping[LabelValues, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "help": self.help,
            "kind": self.kind,
            "labels": list(self.labels),
            "samples": [[list(k), v] for k, v in self.samples.items()],
        }


def export_registry(registry: Registry) -> list[ExportedFamily]:
    return [
        ExportedFamily(f.name, f.help, f.kind, f.label_names, f.series())
        for f in registry.families()
    ]


def parse_export(data: object) -> list[ExportedFamily]:
    """Families from a worker's JSON answer; ValueError when it is malformed."""
    if not isinstance(data, list):
        raise ValueError("metrics export is not a list")
    out = []
    for item in data:
        if not isinstance(item, dict):
            raise ValueError("metrics family is not an object")
        name, help_text, kind = item.get("name"), item.get("help"), item.get("kind")
        labels, samples = item.get("labels"), item.get("samples")
        if not (isinstance(name, str) and isinstance(help_text, str)):
            raise ValueError("metrics family lacks a name or help")
        if kind not in ("counter", "gauge") or not isinstance(labels, list):
            raise ValueError(f"metrics family {name} has a bad kind or labels")
        if not isinstance(samples, list):
            raise ValueError(f"metrics family {name} has no samples list")
        parsed: dict[LabelValues, float] = {}
        for s in samples:
            if not (isinstance(s, list) and len(s) == 2 and isinstance(s[0], list)):
                raise ValueError(f"metrics family {name} has a malformed sample")
            key = tuple(str(v) for v in s[0])
            value = s[1]
            if len(key) != len(labels) or not isinstance(value, (int, float)):
                raise ValueError(f"metrics family {name} has a malformed sample")
            parsed[key] = float(value)
        out.append(ExportedFamily(name, help_text, kind, tuple(str(x) for x in labels), parsed))
    return out


class MetricsMerger:
    """Sums exported families; keeps the counters of retired workers."""

    def __init__(self, max_label_sets: int = 10_000) -> None:
        self._max = max_label_sets
        self._retired: dict[str, ExportedFamily] = {}

    def retire(self, families: Iterable[ExportedFamily]) -> None:
        """Adds an exited worker's last counters to the running totals (gauges
        describe the present and die with the worker)."""
        counters = [f for f in families if f.kind == "counter"]
        self._retired = {f.name: f for f in self.merge([list(self._retired.values()), counters])}

    def merge(self, exports: Sequence[Sequence[ExportedFamily]]) -> list[ExportedFamily]:
        order: list[str] = []
        merged: dict[str, ExportedFamily] = {}
        sums: dict[str, dict[LabelValues, float]] = {}
        for export in exports:
            for fam in export:
                if fam.name not in merged:
                    order.append(fam.name)
                    merged[fam.name] = fam
                    sums[fam.name] = {}
                elif merged[fam.name].labels != fam.labels or merged[fam.name].kind != fam.kind:
                    continue  # version skew between processes: keep the first shape
                target = sums[fam.name]
                overflow = tuple(OVERFLOW_LABEL for _ in fam.labels)
                for key, value in fam.samples.items():
                    if key not in target and len(target) >= self._max:
                        key = overflow
                    target[key] = target.get(key, 0.0) + value
        return [
            ExportedFamily(
                merged[n].name, merged[n].help, merged[n].kind, merged[n].labels, sums[n]
            )
            for n in order
        ]

    def render(
        self, exports: Sequence[Sequence[ExportedFamily]], registry: Registry | None = None
    ) -> str:
        """The Prometheus text of ``exports`` summed with the retired counters,
        plus the extra collectors (process, build info) of ``registry``."""
        merged = self.merge([*exports, list(self._retired.values())])
        return (registry if registry is not None else Registry()).render_families(merged)
