"""The Istio label rules (app, canonical service and revision, service, security policy)."""

from __future__ import annotations

import pytest

from controller.api.model import Labels, Service, ServicePort, Workload
from controller.api.spiffe import SpiffeId
from node.state import build_snapshot
from ztunnel.metrics import LABEL_NAMES, ConnectionLabels, Reporter
from ztunnel.metrics.labels import (
    InboundServices,
    app_name,
    canonical_name,
    canonical_revision,
    inbound_service,
    security_policy,
    service_host,
)


def wl(name: str = "pay-7f9", **labels: str) -> Workload:
    return Workload(name, "shop", "pay", "node-a", ("10.0.0.1",), Labels(labels))


@pytest.mark.parametrize(
    ("labels", "app", "canonical", "revision"),
    [
        ({}, "unknown", "pay-7f9", "latest"),
        ({"app": "pay"}, "pay", "pay", "latest"),
        ({"app": "a", "app.kubernetes.io/name": "b"}, "b", "b", "latest"),
        ({"app": "a", "service.istio.io/canonical-name": "c"}, "a", "c", "latest"),
        ({"version": "v1"}, "unknown", "pay-7f9", "v1"),
        ({"version": "v1", "app.kubernetes.io/version": "v2"}, "unknown", "pay-7f9", "v2"),
        (
            {"app.kubernetes.io/version": "v2", "service.istio.io/canonical-revision": "r3"},
            "unknown",
            "pay-7f9",
            "r3",
        ),
        ({"app": ""}, "unknown", "pay-7f9", "latest"),  # an empty label does not count
    ],
)
def test_workload_label_rules(
    labels: dict[str, str], app: str, canonical: str, revision: str
) -> None:
    w = wl(**labels)
    assert (app_name(w), canonical_name(w), canonical_revision(w)) == (app, canonical, revision)


@pytest.mark.parametrize(
    ("route", "policy"),
    [
        ("hbone", "mutual_tls"),
        ("waypoint", "mutual_tls"),
        ("same_node", "mutual_tls"),
        ("inbound", "mutual_tls"),
        ("passthrough", "none"),
        ("inbound_plaintext", "none"),
        ("refuse", "unknown"),
    ],
)
def test_connection_security_policy(route: str, policy: str) -> None:
    assert security_policy(route) == policy


PAYMENTS = Service("payments", "shop", ("10.96.0.20",), (ServicePort(80, 8080),))


def test_connection_labels_carry_every_istio_label() -> None:
    src = wl("checkout-1", app="checkout", version="v1")
    dst = wl("payments-0", **{"app.kubernetes.io/name": "payments"})
    labels = ConnectionLabels.of(
        Reporter.SOURCE,
        src,
        SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/checkout"),
        dst,
        None,
        service=PAYMENTS,
        route="hbone",
    )
    got = dict(zip(LABEL_NAMES, labels.values(), strict=True))
    assert got == {
        "reporter": "source",
        "source_workload": "checkout",
        "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/checkout",
        "source_app": "checkout",
        "source_canonical_service": "checkout",
        "source_canonical_revision": "v1",
        "destination_workload": "payments",
        "destination_workload_namespace": "shop",
        "destination_principal": "unknown",
        "destination_app": "payments",
        "destination_canonical_service": "payments",
        "destination_canonical_revision": "latest",
        "destination_service": "payments.shop.svc.cluster.local",
        "destination_service_name": "payments",
        "destination_service_namespace": "shop",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }


def test_without_workloads_or_service_everything_is_unknown() -> None:
    values = ConnectionLabels.of(Reporter.DESTINATION, None, None, None, None).values()
    got = dict(zip(LABEL_NAMES, values, strict=True))
    assert got.pop("reporter") == "destination"
    assert got.pop("request_protocol") == "tcp"
    assert got.pop("response_flags") == "-"
    assert set(got.values()) == {"unknown"}


def test_service_host() -> None:
    assert service_host(PAYMENTS) == "payments.shop.svc.cluster.local"


def test_inbound_service_is_the_only_service_selecting_the_workload() -> None:
    pay = Workload("payments-0", "shop", "payments", "node-a", ("10.0.0.2",), Labels())
    lone = Workload("lone", "shop", "lone", "node-a", ("10.0.0.3",), Labels())
    both = Workload("both", "shop", "both", "node-a", ("10.0.0.4",), Labels())
    services = [
        Service("payments", "shop", ("10.96.0.20",), (), endpoints=(pay.key, both.key)),
        Service("payments-v2", "shop", ("10.96.0.21",), (), endpoints=(both.key,)),
    ]
    snap = build_snapshot(
        "node-a", [pay, lone, both, *services], epoch="e", version=1, trust_bundle=None
    )
    assert inbound_service(snap, pay) is snap.services["shop/payments"]
    assert inbound_service(snap, lone) is None
    assert inbound_service(snap, both) is None  # ambiguous: Istio's guess gives up too
    assert inbound_service(snap, None) is None
    cache = InboundServices()
    assert cache.lookup(snap, pay) is snap.services["shop/payments"]
    assert cache.lookup(snap, both) is None
