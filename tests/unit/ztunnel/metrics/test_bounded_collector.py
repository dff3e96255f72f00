"""The prometheus_client-backed registry: the custom collector, caps, callback
families, the merge path, denies by policy, and the component metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ztunnel.metrics import (
    DENY_REASONS,
    ConnectionReport,
    Registry,
    Reporter,
    TrafficMetrics,
    deny_reason,
)
from ztunnel.metrics.aggregate import MetricsMerger, export_registry
from ztunnel.metrics.components import (
    add_process_metrics,
    expiry_samples,
    register_certificate_expiry,
    register_controller_metrics,
    register_pool_gauges,
)
from ztunnel.metrics.prometheus import MAX_LABEL_VALUE, fold


def parsed(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return parsed(text)[(name, frozenset(labels.items()))]


def test_the_collector_renders_through_prometheus_client() -> None:
    reg = Registry()
    c = reg.counter("veil_t_total", "T.", ("a",))
    c.inc(("x",), 3)
    reg.gauge("veil_g", "G.", (), lambda: {(): 2.5})
    text = reg.render()
    assert value(text, "veil_t_total", a="x") == 3
    assert value(text, "veil_g") == 2.5
    # The registry's own families are a prometheus_client CollectorRegistry too.
    assert reg.collectors.get_sample_value("veil_t_total", {"a": "x"}) == 3


def test_the_cap_folds_into_other_and_counts_what_it_dropped() -> None:
    reg = Registry()
    c = reg.counter("veil_c_total", "C.", ("id",), max_label_sets=2)
    for i in range(5):
        c.inc((f"id{i}",))
    text = reg.render()
    assert value(text, "veil_c_total", id="other") == 3
    assert value(text, "veil_metrics_label_sets_dropped_total", metric="veil_c_total") == 3
    assert len([k for k in parsed(text) if k[0] == "veil_c_total"]) == 3


def test_long_label_values_are_cut() -> None:
    reg = Registry()
    c = reg.counter("veil_l_total", "L.", ("v",))
    c.inc(("x" * 10_000,))
    (key,) = c.series()
    assert len(key[0]) == MAX_LABEL_VALUE


def test_callback_gauges_are_capped_too() -> None:
    reg = Registry()
    reg.gauge("veil_many", "M.", ("k",), lambda: {(str(i),): 1.0 for i in range(10)},
              max_label_sets=4)  # fmt: skip
    text = reg.render()
    assert value(text, "veil_many", k="other") == 6
    assert len([k for k in parsed(text) if k[0] == "veil_many"]) == 5


def test_fold_keeps_the_same_sets_every_time() -> None:
    samples: dict[tuple[str, ...], float] = {(str(i),): float(i) for i in range(6)}
    out, folded = fold(samples, 1, 3)
    assert out == {("0",): 0.0, ("1",): 1.0, ("2",): 2.0, ("other",): 12.0}
    assert folded == 3
    assert fold(samples, 1, 10) == (samples, 0)


def test_counter_func_is_a_counter() -> None:
    reg = Registry()
    box = {"n": 4}
    reg.counter_func("veil_cf_total", "CF.", (), lambda: {(): float(box["n"])})
    families = {f.name: f for f in text_string_to_metric_families(reg.render())}
    assert families["veil_cf"].type == "counter"
    assert [f.kind for f in export_registry(reg) if f.name == "veil_cf_total"] == ["counter"]


def test_merge_renders_with_the_supervisors_process_collectors_once() -> None:
    supervisor = Registry()
    add_process_metrics(supervisor)
    workers = []
    for n in (2, 5):
        r = Registry()
        r.counter("istio_tcp_connections_opened_total", "O.", ("reporter",)).inc(("source",), n)
        workers.append(export_registry(r))
    text = MetricsMerger(max_label_sets=10).render(
        [export_registry(supervisor), *workers], supervisor
    )
    assert value(text, "istio_tcp_connections_opened_total", reporter="source") == 7
    assert text.count("# TYPE veil_build_info gauge") == 1
    assert text.count("# TYPE process_start_time_seconds gauge") == 1
    build = [k for k in parsed(text) if k[0] == "veil_build_info"]
    assert len(build) == 1 and {n for n, _ in build[0][1]} == {"version", "python"}


def test_the_merge_cap_holds_for_many_workers() -> None:
    exports = []
    for w in range(4):
        r = Registry()
        c = r.counter("veil_m_total", "M.", ("id",), max_label_sets=3)
        for i in range(3):
            c.inc((f"w{w}-{i}",))
        exports.append(export_registry(r))
    text = MetricsMerger(max_label_sets=3).render(exports)
    assert len([k for k in parsed(text) if k[0] == "veil_m_total"]) == 4  # 3 + other
    assert value(text, "veil_m_total", id="other") == 9


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("denied by DENY policy shop/deny-other", "deny_policy"),
        ("DENY policy shop/x is invalid (bad port)", "invalid_policy"),
        ("no ALLOW policy matched", "no_allow_match"),
        ("peer authentication for shop/p is STRICT (mTLS required)", "peer_authentication_strict"),
        ("forwarded client 10.0.0.9 is not a known workload", "unknown_source"),
        (
            "forwarded client 10.0.0.9 belongs to a, not to the authenticated peer b",
            "unknown_source",
        ),
        ("destination 10.0.0.7 is not a known workload", "unknown_destination"),
        ("policy re-check: no ALLOW policy matched", "policy_recheck"),
        ("something new", "other"),
    ],
)
def test_deny_reasons_are_a_closed_set(text: str, reason: str) -> None:
    assert deny_reason(text) == reason
    assert reason in DENY_REASONS


def report(route: str, direction: str, flags: str = "RBAC", **kw: object) -> ConnectionReport:
    return ConnectionReport(
        Reporter.SOURCE if direction == "outbound" else Reporter.DESTINATION,
        ("10.0.0.1", 1), ("10.0.0.2", 2), verdict="deny", response_flags=flags,
        route=route, direction=direction, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_policy_denies_count_only_decisions_made_here() -> None:
    tm = TrafficMetrics()
    tm.connection_closed(report("inbound", "inbound", reason="denied by DENY policy shop/d",
                                policy="shop/d"))  # fmt: skip
    tm.connection_closed(report("same_node", "outbound", reason="no ALLOW policy matched"))
    # A 401 from the peer is the peer's decision; a no-route refusal is no policy deny.
    tm.connection_closed(report("hbone", "outbound", reason="refused by the destination"))
    tm.connection_closed(report("refuse", "outbound", flags="NR", reason="no endpoints"))
    text = tm.render()
    assert value(text, "veil_ztunnel_policy_denies_total", policy="shop/d",
                 reason="deny_policy") == 1  # fmt: skip
    assert value(text, "veil_ztunnel_policy_denies_total", policy="none",
                 reason="no_allow_match") == 1  # fmt: skip
    total = sum(v for (n, _), v in parsed(text).items() if n == "veil_ztunnel_policy_denies_total")
    assert total == 2
    # Every reason has a series from the start, so rate() works at once.
    for r in DENY_REASONS:
        assert ("veil_ztunnel_policy_denies_total",
                frozenset({("policy", "none"), ("reason", r)})) in parsed(text)  # fmt: skip


def test_policy_denies_are_bounded() -> None:
    tm = TrafficMetrics(max_label_sets=20)
    for i in range(50):
        tm.connection_closed(report("inbound", "inbound", reason="denied by DENY policy",
                                    policy=f"ns/p{i}"))  # fmt: skip
    assert len(tm.denies.series()) == 21


@dataclass(frozen=True)
class Pooled:
    streams: int
    going_away: bool = False


def test_pool_gauges() -> None:
    reg = Registry()
    conns = [Pooled(0), Pooled(3), Pooled(1, going_away=True)]
    register_pool_gauges(reg, lambda: conns)
    text = reg.render()
    assert value(text, "veil_ztunnel_hbone_pool_connections", state="open") == 2
    assert value(text, "veil_ztunnel_hbone_pool_connections", state="draining") == 1
    assert value(text, "veil_ztunnel_hbone_pool_idle_connections") == 1
    assert value(text, "veil_ztunnel_hbone_pool_streams") == 4


@dataclass(frozen=True)
class Cert:
    not_after: datetime


@dataclass(frozen=True)
class State:
    identity: str
    certificate: Cert | None


def test_certificate_expiry_is_a_timestamp_and_bounded_to_the_soonest() -> None:
    states = [
        State(f"spiffe://td/ns/a/sa/s{i}", Cert(datetime(2030, 1, 1 + i, tzinfo=UTC)))
        for i in range(5)
    ] + [State("spiffe://td/ns/a/sa/pending", None)]
    got = expiry_samples(states, max_identities=2)
    assert got == {
        ("spiffe://td/ns/a/sa/s0",): datetime(2030, 1, 1, tzinfo=UTC).timestamp(),
        ("spiffe://td/ns/a/sa/s1",): datetime(2030, 1, 2, tzinfo=UTC).timestamp(),
    }
    reg = Registry()
    register_certificate_expiry(reg, lambda: states, max_identities=3)
    text = reg.render()
    assert len([k for k in parsed(text) if k[0].startswith("veil_ztunnel_certificate")]) == 3


@dataclass
class Channel:
    reconnects: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    reachable: bool = True


def test_controller_metrics_read_the_channel() -> None:
    reg = Registry()
    ch = Channel()
    register_controller_metrics(reg, ch)
    ch.reconnects, ch.reachable = 2, False
    ch.errors["UNAVAILABLE"] = 5
    text = reg.render()
    assert value(text, "veil_ztunnel_controller_reconnects_total") == 2
    assert value(text, "veil_ztunnel_controller_errors_total", code="UNAVAILABLE") == 5
    assert value(text, "veil_ztunnel_controller_reachable") == 0
