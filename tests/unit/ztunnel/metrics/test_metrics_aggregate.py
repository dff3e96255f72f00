"""Summing several processes' metrics: sums, caps, retired workers, bad input."""

from __future__ import annotations

import pytest

from ztunnel.metrics import Registry
from ztunnel.metrics.aggregate import ExportedFamily, MetricsMerger, export_registry, parse_export


def worker_registry(opened: float, active: float) -> Registry:
    r = Registry()
    c = r.counter("veil_test_opened_total", "Opened.", ("reporter",))
    c.inc(("destination",), opened)
    r.gauge("veil_test_active", "Active.", ("direction",), lambda: {("inbound",): active})
    return r


def test_counters_and_gauges_are_summed_over_workers() -> None:
    exports = [export_registry(worker_registry(3, 1)), export_registry(worker_registry(4, 2))]
    text = MetricsMerger().render(exports)
    assert 'veil_test_opened_total{reporter="destination"} 7.0' in text
    assert 'veil_test_active{direction="inbound"} 3.0' in text
    assert text.count("# TYPE veil_test_opened_total counter") == 1


def test_a_retired_workers_counters_are_kept_but_not_its_gauges() -> None:
    m = MetricsMerger()
    gone = export_registry(worker_registry(5, 9))
    m.retire(gone)
    text = m.render([export_registry(worker_registry(1, 1))])
    assert 'veil_test_opened_total{reporter="destination"} 6.0' in text
    assert 'veil_test_active{direction="inbound"} 1.0' in text


def test_the_label_set_cap_holds_after_the_merge() -> None:
    fams = [
        [ExportedFamily("m_total", "h", "counter", ("w",), {(f"w{i}-{j}",): 1.0 for j in range(3)})]
        for i in range(3)
    ]
    merged = MetricsMerger(max_label_sets=4).merge(fams)[0]
    assert len(merged.samples) == 5  # four kept, plus "other"
    assert merged.samples[("other",)] == 5.0
    assert sum(merged.samples.values()) == 9.0


def test_export_survives_json_and_rejects_garbage() -> None:
    data = [f.to_json() for f in export_registry(worker_registry(2, 1))]
    assert parse_export(data) == export_registry(worker_registry(2, 1))
    bad: object
    for bad in (
        {},
        [1],
        [{"name": "x", "help": "h", "kind": "summary", "labels": [], "samples": []}],
        [{"name": "x", "help": "h", "kind": "counter", "labels": ["a"], "samples": [[[], 1]]}],
        [{"name": "x", "help": "h", "kind": "counter", "labels": [], "samples": [[[], "1"]]}],
    ):
        with pytest.raises(ValueError):
            parse_export(bad)
