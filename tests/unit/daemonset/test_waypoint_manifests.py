"""daemonset/waypoint/: the waypoint template validates against the Kubernetes 1.30
schemas and is shaped as docs/waypoint.md says (labels, identity, ports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller.api.model import DATAPLANE_MODE_LABEL, OPT_OUT, WAYPOINT_LABEL

ROOT = Path(__file__).resolve().parents[3]
WAYPOINT = ROOT / "daemonset" / "waypoint"


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((WAYPOINT / "waypoint.yaml").read_text()) if d]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: d["kind"])
def test_validates_against_kubernetes_1_30(doc: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(doc, "1.30", strict=True) == "1.30"


def test_kustomization_lists_the_template() -> None:
    k = yaml.safe_load((WAYPOINT / "kustomization.yaml").read_text())
    assert k["resources"] == ["waypoint.yaml"]


def test_shape() -> None:
    by_kind = {d["kind"]: d for d in documents()}
    assert set(by_kind) == {"ServiceAccount", "Deployment", "Service"}
    dep = by_kind["Deployment"]
    name = dep["metadata"]["name"]
    pod = dep["spec"]["template"]
    # The label that makes these pods the waypoint's replicas, and the opt-out
    # that keeps the agent from steering the waypoint's own HBONE.
    assert pod["metadata"]["labels"][WAYPOINT_LABEL] == name
    assert pod["metadata"]["labels"][DATAPLANE_MODE_LABEL] == OPT_OUT
    assert pod["spec"]["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    assert container["args"][:2] == ["waypoint", "run"]
    assert f"--name={name}" in container["args"]
    assert {p["containerPort"] for p in container["ports"]} == {15008, 15020}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "VEIL_ADMIN_ADDRESS" not in env  # admin stays on loopback (the default)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    svc = by_kind["Service"]
    assert svc["spec"]["selector"] == {WAYPOINT_LABEL: name}
