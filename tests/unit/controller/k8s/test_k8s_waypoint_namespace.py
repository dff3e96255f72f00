"""Cross-namespace waypoints in Kubernetes mode: the labels in the model, and the
pure check behind a waypoint's join (which Namespace or Service names it)."""

from __future__ import annotations

from typing import Any

import pytest

from controller.k8s.convert import convert
from controller.k8s.tokenreview import waypoint_ref_of

Obj = dict[str, Any]
CROSS = {"veil.io/use-waypoint": "mesh-wp", "veil.io/use-waypoint-namespace": "mesh"}


def namespace(name: str, labels: dict[str, str]) -> Obj:
    return {"metadata": {"name": name, "labels": {"veil.io/dataplane-mode": "ambient", **labels}}}


def service(name: str, ns: str, labels: dict[str, str]) -> Obj:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080}]},
    }


def test_the_labels_flow_into_the_model() -> None:
    conv = convert(
        "cluster.local",
        namespaces=[namespace("shop", CROSS), namespace("bank", {})],
        pods=[],
        services=[service("pay", "bank", CROSS), service("cart", "bank", {})],
    )
    nss = {n.name: n for n in conv.state.namespaces}
    assert nss["shop"].waypoint == ("mesh", "mesh-wp")
    assert nss["bank"].waypoint is None
    svcs = {s.name: s for s in conv.state.services}
    assert svcs["pay"].use_waypoint_namespace == "mesh"
    assert svcs["pay"].waypoint == ("mesh", "mesh-wp")
    assert svcs["cart"].waypoint is None


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        # A Namespace: its own name by default (it has no metadata.namespace).
        (namespace("shop", {"veil.io/use-waypoint": "wp"}), ("shop", "wp")),
        (namespace("shop", CROSS), ("mesh", "mesh-wp")),
        # A Service: its namespace by default.
        (service("pay", "bank", {"veil.io/use-waypoint": "wp"}), ("bank", "wp")),
        (service("pay", "bank", CROSS), ("mesh", "mesh-wp")),
        # The namespace label alone opts into nothing.
        (service("pay", "bank", {"veil.io/use-waypoint-namespace": "mesh"}), None),
        (namespace("shop", {}), None),
        # Malformed objects never raise.
        ({"metadata": "x"}, None),
        ({"metadata": {"labels": {"veil.io/use-waypoint": "wp"}}}, None),
        ({"metadata": {"name": "n", "labels": {"veil.io/use-waypoint": 3}}}, None),
        ({}, None),
    ],
)
def test_waypoint_ref_of(obj: Obj, expected: tuple[str, str] | None) -> None:
    assert waypoint_ref_of(obj) == expected
