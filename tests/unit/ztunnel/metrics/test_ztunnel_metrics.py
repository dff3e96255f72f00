"""Prometheus exposition, bounded cardinality, Istio TCP metrics and the access log."""

from __future__ import annotations

import json
import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from controller.api.model import Labels, Workload
from controller.api.spiffe import SpiffeId
from ztunnel.metrics import (
    ACCESS_LOGGER,
    LABEL_NAMES,
    ConnectionLabels,
    ConnectionReport,
    Registry,
    Reporter,
    TrafficMetrics,
    canonical_name,
)

# One sample line of the text format: name{label="value",...} value
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(
    rf"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{{{_LABEL}(,{_LABEL})*\}})? (-?[0-9.e+]+|NaN|[+-]Inf)$"
)


def assert_valid_exposition(text: str) -> dict[str, float]:
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert _SAMPLE.match(line), line
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
    return samples


def sample_value(text: str, name: str, labels: dict[str, str]) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (parsed by
    prometheus_client's own parser)."""
    found = [
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


def test_counter_exposition_and_escaping() -> None:
    reg = Registry()
    c = reg.counter("veil_test_total", "A test counter.", ("who",))
    c.inc(("a",))
    c.inc(("a",), 2)
    c.inc(('we"ird\\name\nx',), 0.5)
    text = reg.render()
    samples = assert_valid_exposition(text)
    assert samples['veil_test_total{who="a"}'] == 3
    assert samples['veil_test_total{who="we\\"ird\\\\name\\nx"}'] == 0.5
    assert "# TYPE veil_test_total counter" in text
    assert "# HELP veil_test_total A test counter." in text


def test_counter_rejects_bad_use() -> None:
    reg = Registry()
    c = reg.counter("veil_x_total", "x", ("a", "b"))
    with pytest.raises(ValueError):
        c.inc(("only-one",))
    with pytest.raises(ValueError):
        c.inc({"a": "1"})
    with pytest.raises(ValueError):
        c.inc(("1", "2"), -1)
    with pytest.raises(ValueError):
        reg.counter("veil_x_total", "again")
    with pytest.raises(ValueError):
        reg.counter("bad name", "x")
    with pytest.raises(ValueError):
        reg.counter("veil_y_total", "x", ("__reserved",))


def test_cardinality_is_capped_and_overflow_is_counted() -> None:
    reg = Registry()
    c = reg.counter("veil_capped_total", "capped", ("id",), max_label_sets=3)
    for i in range(10):
        c.inc((str(i),))
    c.inc(("0",))  # an existing set still counts normally
    series = c.series()
    assert len(series) == 4  # 3 real sets + "other"
    assert series[("other",)] == 7
    assert series[("0",)] == 2
    assert reg.dropped.value(("veil_capped_total",)) == 7
    assert_valid_exposition(reg.render())


def test_gauges_are_read_at_scrape_time() -> None:
    reg = Registry()
    box = {"v": 1.0}
    reg.gauge("veil_g", "g", ("k",), lambda: {("x",): box["v"]})
    assert 'veil_g{k="x"} 1' in reg.render()
    box["v"] = 2.5
    assert 'veil_g{k="x"} 2.5' in reg.render()


@given(st.lists(st.text(max_size=12), max_size=20))
def test_any_label_values_render_valid_exposition(values: list[str]) -> None:
    reg = Registry()
    c = reg.counter("veil_fuzz_total", "fuzz", ("v",), max_label_sets=8)
    for v in values:
        c.inc((v,))
    assert_valid_exposition(reg.render())


SRC = Workload(
    "checkout-7f9",
    "shop",
    "checkout",
    "node-a",
    ("10.0.1.5",),
    Labels({"app": "checkout"}),
    enrolled=True,
)
DST = Workload("payments-0", "prod", "payments", "node-b", ("10.0.2.5",), Labels(), enrolled=True)
SRC_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/checkout")
DST_ID = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/payments")


def test_canonical_name() -> None:
    assert canonical_name(SRC) == "checkout"
    assert canonical_name(DST) == "payments-0"
    w = Workload("p", "n", "s", "x", (), Labels({"app": "a", "app.kubernetes.io/name": "b"}))
    assert canonical_name(w) == "b"


def test_traffic_metrics_and_access_log(caplog: pytest.LogCaptureFixture) -> None:
    tm = TrafficMetrics()
    labels = ConnectionLabels.of(Reporter.SOURCE, SRC, SRC_ID, DST, DST_ID)
    tm.connection_opened(labels)
    report = ConnectionReport(
        reporter=Reporter.SOURCE,
        src_addr=("10.0.1.5", 40000),
        dst_addr=("10.0.2.5", 8080),
        src_workload=SRC,
        dst_workload=DST,
        src_principal=SRC_ID,
        dst_principal=DST_ID,
        received_bytes=100,
        sent_bytes=2500,
        duration=1.25,
        verdict="allow",
        reason="allowed by ALLOW policy prod/p",
        policy="prod/p",
        direction="outbound",
        route="hbone",
    )
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        tm.connection_closed(report)
    text = tm.render()
    assert_valid_exposition(text)
    want = {
        "reporter": "source",
        "source_workload": "checkout",
        "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/checkout",
        "source_app": "checkout",
        "destination_workload": "payments-0",
        "destination_workload_namespace": "prod",
        "destination_principal": "spiffe://cluster.local/ns/prod/sa/payments",
        "destination_app": "unknown",
        "request_protocol": "tcp",
        "response_flags": "-",
    }
    assert sample_value(text, "istio_tcp_connections_opened_total", want) == 1
    closed = {**want, "connection_security_policy": "mutual_tls"}
    assert sample_value(text, "istio_tcp_connections_closed_total", closed) == 1
    assert sample_value(text, "istio_tcp_received_bytes_total", closed) == 100
    assert sample_value(text, "istio_tcp_sent_bytes_total", closed) == 2500

    records = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(records) == 1
    entry = json.loads(records[0].getMessage())
    assert entry["src"] == "10.0.1.5:40000" and entry["dst"] == "10.0.2.5:8080"
    assert entry["src_workload"] == "shop/checkout-7f9"
    assert entry["dst_identity"] == str(DST_ID)
    assert (entry["bytes_received"], entry["bytes_sent"]) == (100, 2500)
    assert entry["duration_ms"] == 1250.0
    assert entry["verdict"] == "allow" and entry["policy"] == "prod/p"
    assert entry["response_flags"] == "-" and entry["event"] == "connection_closed"
    # RFC 3339 UTC, like every time veilctl prints.
    assert entry["time"].endswith("Z") and entry["time"][10] == "T"


def test_denied_plaintext_connection_labels_unknown(caplog: pytest.LogCaptureFixture) -> None:
    tm = TrafficMetrics()
    report = ConnectionReport(
        reporter=Reporter.DESTINATION,
        src_addr=("fd00::9", 1234),
        dst_addr=("10.0.2.5", 80),
        dst_workload=DST,
        dst_principal=DST_ID,
        verdict="deny",
        reason="STRICT",
        error="refused",
        response_flags="DENY",
    )
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        tm.connection_closed(report)
    values = report.labels.values()
    assert dict(zip(LABEL_NAMES, values, strict=True))["source_principal"] == "unknown"
    assert tm.closed.value(values) == 1
    assert tm.received.value(values) == 0
    entry = json.loads(caplog.records[-1].getMessage())
    assert entry["src"] == "[fd00::9]:1234" and entry["src_identity"] is None
    assert entry["verdict"] == "deny" and entry["error"] == "refused"


def test_add_bytes_for_long_lived_connections() -> None:
    tm = TrafficMetrics()
    labels = ConnectionLabels.of(Reporter.SOURCE, SRC, SRC_ID, DST, DST_ID)
    tm.add_bytes(labels, received=10, sent=20)
    tm.connection_closed(
        ConnectionReport(Reporter.SOURCE, None, None, SRC, DST, SRC_ID, DST_ID, 10, 20),
        bytes_counted=True,
    )
    assert tm.received.value(labels.values()) == 10
    assert tm.sent.value(labels.values()) == 20


def test_traffic_label_sets_are_bounded() -> None:
    tm = TrafficMetrics(max_label_sets=5)
    for i in range(50):
        w = Workload(f"w{i}", "ns", "sa", "n", (), Labels())
        tm.connection_opened(ConnectionLabels.of(Reporter.SOURCE, w, None, DST, DST_ID))
    assert len(tm.opened.series()) == 6
    assert tm.registry.dropped.value(("istio_tcp_connections_opened_total",)) == 45
