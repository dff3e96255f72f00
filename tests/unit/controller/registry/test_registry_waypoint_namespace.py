"""The YAML registry's ``veil.io/use-waypoint-namespace`` label: validation that
names the field, the model it yields, and its trip over the wire."""

from __future__ import annotations

import pytest

from controller.api.model import WatchUpdate
from controller.api.wire import watch_response_to_pb, watch_update_from_pb
from controller.registry.document import parse_registry
from controller.registry.errors import RegistryError

BASE = """
namespaces:
  - {name: mesh}
  - name: shop
    labels: {veil.io/use-waypoint: mesh-wp, veil.io/use-waypoint-namespace: mesh}
  - name: bank
workloads:
  - {name: mesh-wp-0, namespace: mesh, serviceAccount: mesh-wp, node: n9, ips: [10.0.9.1],
     labels: {veil.io/waypoint: mesh-wp}}
services:
  - name: vault
    namespace: bank
    vips: [10.96.3.10]
    ports: [{port: 80, targetPort: 8080}]
    labels: {veil.io/use-waypoint: mesh-wp, veil.io/use-waypoint-namespace: mesh}
  - {name: ledger, namespace: bank, vips: [10.96.3.20], ports: [{port: 80}],
     labels: {veil.io/use-waypoint: bank-wp}}
"""


def test_namespace_and_service_name_a_waypoint_elsewhere() -> None:
    state = parse_registry(BASE)
    nss = {n.name: n for n in state.namespaces}
    assert nss["shop"].waypoint == ("mesh", "mesh-wp")
    assert nss["bank"].waypoint is None
    svcs = {s.name: s for s in state.services}
    assert svcs["vault"].waypoint == ("mesh", "mesh-wp")
    assert svcs["ledger"].waypoint == ("bank", "bank-wp")  # default: its own namespace


def test_the_fields_survive_the_wire() -> None:
    state = parse_registry(BASE)
    update = WatchUpdate(
        epoch="e", version=1, snapshot=True, upserts=(*state.namespaces, *state.services)
    )
    back = watch_update_from_pb(watch_response_to_pb(update))
    got = {r.key: r for r in back.upserts}
    assert got["bank/vault"].waypoint == ("mesh", "mesh-wp")  # type: ignore[union-attr]
    assert got["bank/ledger"].use_waypoint_namespace == ""  # type: ignore[union-attr]
    assert got["shop"].waypoint == ("mesh", "mesh-wp")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("labels", "where", "message"),
    [
        (
            "{veil.io/use-waypoint-namespace: mesh}",
            "services[0] (bank/vault)",
            'field "labels.veil.io/use-waypoint-namespace": "mesh" names the namespace of a '
            "waypoint, but no veil.io/use-waypoint label names the waypoint",
        ),
        (
            "{veil.io/use-waypoint: w, veil.io/use-waypoint-namespace: Mesh_1}",
            "services[0] (bank/vault)",
            'field "labels.veil.io/use-waypoint-namespace": "Mesh_1" is not a valid DNS-1123 label',
        ),
    ],
)
def test_invalid_service_labels_name_the_field(labels: str, where: str, message: str) -> None:
    text = f"""
namespaces: [{{name: bank}}]
services:
  - {{name: vault, namespace: bank, vips: [10.96.3.10], ports: [{{port: 80}}], labels: {labels}}}
"""
    with pytest.raises(RegistryError) as e:
        parse_registry(text)
    assert where in str(e.value) and message in str(e.value), str(e.value)


def test_invalid_namespace_label_names_the_field() -> None:
    text = """
namespaces:
  - {name: shop, labels: {veil.io/use-waypoint-namespace: mesh}}
"""
    with pytest.raises(RegistryError) as e:
        parse_registry(text)
    assert 'namespaces[0] (shop): field "labels.veil.io/use-waypoint-namespace"' in str(e.value)
    assert "add veil.io/use-waypoint: <waypoint name>" in str(e.value)
