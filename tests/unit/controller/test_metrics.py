"""controller.metrics: issuance and refusal counters fed by the real IdentityService,
and the scrape-time state gauges in both registry modes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.api.errors import ApiError
from controller.api.model import RegistryState, Workload
from controller.auth import JoinTokenStore
from controller.ca import CertificateAuthority
from controller.identity import IdentityService
from controller.metrics import (
    ISSUE_KINDS,
    REFUSAL_REASONS,
    ControllerMetrics,
    ControllerSnapshot,
    KindAvailability,
)

TD = "cluster.local"
HOUR = timedelta(hours=1)
CART = "spiffe://cluster.local/ns/shop/sa/cart"
STATE = RegistryState(
    trust_domain=TD,
    workloads=(Workload("cart-1", "shop", "cart", "node-1", ("10.1.0.5",), enrolled=True),),
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: ControllerMetrics) -> Samples:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def refusals(got: Samples, operation: str, reason: str) -> float:
    return got[
        (
            "veil_controller_certificate_refusals_total",
            (("operation", operation), ("reason", reason)),
        )
    ]


def issued(got: Samples, kind: str) -> float:
    return got[("veil_controller_certificates_issued_total", (("kind", kind),))]


@pytest.fixture
def wired(
    tmp_path: Path, ca: CertificateAuthority
) -> tuple[IdentityService, JoinTokenStore, ControllerMetrics]:
    metrics = ControllerMetrics()
    tokens = JoinTokenStore(tmp_path / "ctl", ca_fingerprint=lambda: ca.fingerprint)
    svc = IdentityService(ca, tokens, lambda: STATE, recorder=metrics)
    return svc, tokens, metrics


def test_every_series_exists_before_anything_happens() -> None:
    got = scrape(ControllerMetrics())
    for kind in ISSUE_KINDS:
        assert issued(got, kind) == 0
    for op in ("certificate", "join"):
        for reason in REFUSAL_REASONS:
            assert refusals(got, op, reason) == 0
    assert got[("veil_controller_registry_reload_duration_seconds_count", ())] == 0


async def test_issued_and_refused_by_reason(wired: Any, csr_factory: Any) -> None:
    svc, tokens, metrics = wired
    _, csr = csr_factory(CART)
    await svc.create_certificate("node-1", csr, CART, 0)
    refused: list[tuple[str, tuple[Any, ...]]] = [
        ("not_scheduled", ("node-2", csr, CART, 0)),
        ("invalid_identity", ("node-1", csr, "spiffe://other.td/ns/shop/sa/cart", 0)),
        ("invalid_identity", ("node-1", csr, "not a spiffe id", 0)),
        ("invalid_ttl", ("node-1", csr, CART, -5)),
        ("invalid_csr", ("node-1", csr_factory("spiffe://cluster.local/ns/x/sa/y")[1], CART, 0)),
    ]
    for _, args in refused:
        with pytest.raises(ApiError):
            await svc.create_certificate(*args)
    node_sid = "spiffe://cluster.local/veil/node/node-1"
    _, node_csr = csr_factory(node_sid)
    await svc.create_certificate("node-1", node_csr, node_sid, 0)
    await svc.join_node(tokens.create("node-1", HOUR), node_csr, "node-1")
    with pytest.raises(ApiError):
        await svc.join_node("vjt_bogus.secret", node_csr, "node-1")
    with pytest.raises(ApiError):
        await svc.join_node(tokens.create("node-1", HOUR), node_csr, "Node/1")
    with pytest.raises(ApiError):
        await svc.join_node(tokens.create("node-1", HOUR), csr, "node-1")

    got = scrape(metrics)
    assert issued(got, "workload") == 1
    assert issued(got, "node") == 1
    assert issued(got, "join") == 1
    assert refusals(got, "certificate", "not_scheduled") == 1
    assert refusals(got, "certificate", "invalid_identity") == 2
    assert refusals(got, "certificate", "invalid_ttl") == 1
    assert refusals(got, "certificate", "invalid_csr") == 1
    assert refusals(got, "join", "unauthenticated") == 1
    assert refusals(got, "join", "invalid_node_name") == 1
    assert refusals(got, "join", "invalid_csr") == 1


async def test_refusals_keep_the_error_the_node_sees(wired: Any, csr_factory: Any) -> None:
    svc, _, _ = wired
    _, csr = csr_factory(CART)
    with pytest.raises(ApiError) as e:
        await svc.create_certificate("node-2", csr, CART, 0)
    assert e.value.code == "PERMISSION_DENIED" and "node-2" in e.value.message
    assert e.value.hint


def test_unknown_reasons_and_kinds_cannot_grow_the_label_sets() -> None:
    metrics = ControllerMetrics()
    for i in range(50):
        metrics.refused("certificate", f"reason-{i}")
        metrics.refused(f"op-{i}", "not_scheduled")
    got = scrape(metrics)
    assert refusals(got, "certificate", "other") == 50
    assert refusals(got, "certificate", "not_scheduled") == 50
    names = {
        labels for (name, labels) in got if name.startswith("veil_controller_certificate_refusals")
    }
    assert len(names) == 2 * len(REFUSAL_REASONS)


def test_state_gauges_in_kubernetes_mode() -> None:
    snap = ControllerSnapshot(
        phase="serving",
        ready=True,
        source="kubernetes",
        registry_generation=7,
        registry_loaded_at=1_700_000_000.0,
        registry_error_at=1_700_000_100.0,
        workloads=3,
        services=2,
        policies=1,
        watchers=4,
        watch_pending=9,
        discovery_version=12,
        kinds=(
            KindAvailability("pods", True, "synced"),
            KindAvailability("endpointslices", False, "failed"),
        ),
        leader=True,
        ca_not_after=1_800_000_000.0,
        trust_domain=TD,
    )
    got = scrape(ControllerMetrics(lambda: snap))
    assert got[("veil_controller_phase", (("phase", "serving"),))] == 1
    assert got[("veil_controller_phase", (("phase", "syncing"),))] == 0
    assert got[("veil_controller_ready", ())] == 1
    assert got[("veil_controller_registry_generation", ())] == 7
    assert got[("veil_controller_registry_error", ())] == 1
    assert got[("veil_controller_registry_last_error_timestamp_seconds", ())] == 1_700_000_100
    assert got[("veil_controller_registry_objects", (("kind", "workload"),))] == 3
    assert got[("veil_controller_watchers", ())] == 4
    assert got[("veil_controller_watch_pending_changes", ())] == 9
    assert got[("veil_controller_leader", ())] == 1
    assert got[("veil_controller_ca_expiry_timestamp_seconds", ())] == 1_800_000_000
    kind = "veil_controller_kubernetes_kind_available"
    assert got[(kind, (("kind", "pods"), ("required", "true")))] == 1
    assert got[(kind, (("kind", "endpointslices"), ("required", "false")))] == 0
    build = [labels for (name, labels) in got if name == "veil_controller_build_info"]
    assert build and ("trust_domain", TD) in build[0]


def test_yaml_mode_has_no_kubernetes_series() -> None:
    got = scrape(ControllerMetrics(lambda: ControllerSnapshot(source="yaml")))
    assert not [n for n, _ in got if "kubernetes" in n or n == "veil_controller_leader"]
    assert got[("veil_controller_registry_error", ())] == 0


def test_reload_timing_records_even_when_the_apply_raises() -> None:
    metrics = ControllerMetrics()
    metrics.timed(lambda: None)

    def broken() -> None:
        raise RuntimeError("hub exploded")

    with pytest.raises(RuntimeError):
        metrics.timed(broken)
    assert scrape(metrics)[("veil_controller_registry_reload_duration_seconds_count", ())] == 2
