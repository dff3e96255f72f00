"""agent.daemon.metrics: drop series named by pod and capped, monotonic node totals,
the exposition the collector renders, and the address parser."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.bpf.codes import DropReason, PodFlag
from agent.bpf.maps import PodCounters, PodEntry
from agent.daemon.metrics import (
    OVERFLOW,
    AgentMetrics,
    DataplaneSample,
    DropTotals,
    drop_view,
    parse_metrics_address,
)
from node.dataplane import AGENT_METRICS_PORT

NAMES = {
    IPv4Address("10.244.1.10"): ("shop", "client"),
    IPv4Address("10.244.1.11"): ("shop", "other"),
}


def owner(ip: IPv4Address) -> tuple[str, str] | None:
    return NAMES.get(ip)


def entry(ifindex: int, ip: str) -> PodEntry:
    return PodEntry(ifindex, IPv4Address(ip), PodFlag.ENROLLED)


def row(**drops: int) -> PodCounters:
    return PodCounters(drops={DropReason[k.upper()]: n for k, n in drops.items()})


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_drops_are_named_by_the_pod_that_owns_the_veth_address() -> None:
    view = drop_view(
        [entry(7, "10.244.1.10"), entry(8, "10.244.1.11")],
        {7: row(icmp=3, spoofed_source=1), 8: row(), 9: row(no_listener=2)},
        owner,
    )
    assert view.pods == {
        ("shop", "client"): {DropReason.ICMP: 3, DropReason.SPOOFED_SOURCE: 1},
        # A row whose pod entry is gone is kept, under a name that says so.
        ("unknown", "ifindex-9"): {DropReason.NO_LISTENER: 2},
    }
    assert view.folded == 0


def test_pods_without_drops_get_no_series() -> None:
    view = drop_view([entry(7, "10.244.1.10")], {7: row(icmp=0)}, owner)
    assert view.pods == {}


def test_pods_beyond_the_cap_fold_into_other_and_are_counted() -> None:
    entries = [entry(i, f"10.0.0.{i}") for i in range(1, 6)]
    names = {e.ip: ("ns", f"pod-{e.ifindex}") for e in entries}
    counters = {i: row(icmp=i) for i in range(1, 6)}
    view = drop_view(entries, counters, names.get, max_pods=2)
    # Chosen by name, so the same pods keep their series from scrape to scrape.
    assert set(view.pods) == {("ns", "pod-1"), ("ns", "pod-2"), (OVERFLOW, OVERFLOW)}
    assert view.pods[(OVERFLOW, OVERFLOW)] == {DropReason.ICMP: 3 + 4 + 5}
    assert view.folded == 3


def test_node_totals_never_fall_when_a_pod_row_is_deleted() -> None:
    totals = DropTotals()
    assert totals.update({7: row(icmp=3), 8: row(icmp=2)}) == {DropReason.ICMP: 5}
    assert totals.update({7: row(icmp=4)}) == {DropReason.ICMP: 6}  # pod 8 deleted
    # ifindex 7 reused by a new pod: its row starts again from zero.
    assert totals.update({7: row(icmp=1, malformed=2)}) == {
        DropReason.ICMP: 7,
        DropReason.MALFORMED: 2,
    }


def test_exposition_has_every_reason_and_the_per_pod_series() -> None:
    view = drop_view([entry(7, "10.244.1.10")], {7: row(icmp=3)}, owner)
    sample = DataplaneSample(
        node_drops={DropReason.ICMP: 3},
        drops=view,
        pod_entries=3,
        enrolled=2,
        outbound_redirected=10,
        inbound_redirected=4,
        registry_synced=True,
        local_workloads=3,
        pending=1,
    )
    metrics = AgentMetrics(lambda: sample)
    metrics.reconciled(full=True, seconds=0.004, failed_actions=0)
    metrics.reconciled(full=False, seconds=0.001, failed_actions=2)
    metrics.pass_failed()
    got = samples(metrics.exposition())
    for reason in DropReason:
        if reason is not DropReason.NONE:
            assert (
                "veil_agent_bpf_drops_total",
                (("reason", reason.label),),
            ) in got
    assert got[("veil_agent_bpf_drops_total", (("reason", "icmp"),))] == 3
    key = (("reason", "icmp"), ("workload", "client"), ("workload_namespace", "shop"))
    assert got[("veil_agent_bpf_pod_drops_total", key)] == 3
    assert got[("veil_agent_enrolled_pods", ())] == 2
    assert got[("veil_agent_pending_pods", ())] == 1
    assert got[("veil_agent_registry_synced", ())] == 1
    assert got[("veil_agent_bpf_redirected_total", (("direction", "outbound"),))] == 10
    assert got[("veil_agent_reconcile_duration_seconds_count", (("scope", "full"),))] == 1
    assert got[("veil_agent_reconcile_duration_seconds_count", (("scope", "partial"),))] == 1
    assert got[("veil_agent_reconcile_errors_total", (("kind", "action"),))] == 2
    assert got[("veil_agent_reconcile_errors_total", (("kind", "pass"),))] == 1


def test_label_values_from_the_registry_are_escaped() -> None:
    weird = {IPv4Address("10.0.0.1"): ('ns"x', "pod\nname")}
    view = drop_view([entry(1, "10.0.0.1")], {1: row(icmp=1)}, weird.get)
    text = AgentMetrics(lambda: DataplaneSample(drops=view)).exposition()
    got = samples(text)
    assert (
        got[
            (
                "veil_agent_bpf_pod_drops_total",
                (("reason", "icmp"), ("workload", "pod\nname"), ("workload_namespace", 'ns"x')),
            )
        ]
        == 1
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:15022", ("127.0.0.1", 15022)),
        ("10.0.0.5", ("10.0.0.5", AGENT_METRICS_PORT)),
        ("[::1]:9000", ("::1", 9000)),
        ("[fd00::1]", ("fd00::1", AGENT_METRICS_PORT)),
        ("off", None),
    ],
)
def test_metrics_address(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize("text", [":15022", "host:port", "1.2.3.4:70000", "[::1", "[::1]x"])
def test_bad_metrics_address_says_why(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_metrics_address(text)
