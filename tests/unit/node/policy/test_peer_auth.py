"""Table-driven tests of the effective PeerAuthentication mode."""

from __future__ import annotations

import pytest

from controller.api.model import (
    ROOT_NAMESPACE,
    Labels,
    PeerAuthentication,
    PeerAuthMode,
    Workload,
)
from node.policy import effective_mode, mode_source
from node.state import build_snapshot

S, P, U = PeerAuthMode.STRICT, PeerAuthMode.PERMISSIVE, PeerAuthMode.UNSET
W = Workload("api-1", "prod", "api", "node-a", ("10.0.1.5",), Labels({"app": "api"}), enrolled=True)


def pa(
    name: str,
    ns: str,
    mode: PeerAuthMode,
    selector: dict[str, str] | None = None,
) -> PeerAuthentication:
    return PeerAuthentication(name, ns, mode, Labels(selector) if selector is not None else None)


CASES = [
    ("default-permissive", [], P, None),
    ("mesh-strict", [pa("mesh", ROOT_NAMESPACE, S)], S, "veil-system/mesh"),
    ("namespace-beats-mesh", [pa("mesh", ROOT_NAMESPACE, S), pa("ns", "prod", P)], P, "prod/ns"),
    (
        "workload-beats-namespace",
        [pa("ns", "prod", P), pa("wl", "prod", S, {"app": "api"})],
        S,
        "prod/wl",
    ),
    (
        "workload-beats-mesh",
        [pa("mesh", ROOT_NAMESPACE, P), pa("wl", "prod", S, {"app": "api"})],
        S,
        "prod/wl",
    ),
    (
        "selector-miss-falls-back",
        [pa("ns", "prod", S), pa("wl", "prod", P, {"app": "web"})],
        S,
        "prod/ns",
    ),
    (
        "unset-workload-inherits-namespace",
        [pa("ns", "prod", S), pa("wl", "prod", U, {"app": "api"})],
        S,
        "prod/ns",
    ),
    (
        "unset-namespace-inherits-mesh",
        [pa("mesh", ROOT_NAMESPACE, S), pa("ns", "prod", U)],
        S,
        "veil-system/mesh",
    ),
    ("all-unset-default", [pa("mesh", ROOT_NAMESPACE, U), pa("ns", "prod", U)], P, None),
    ("other-namespace-ignored", [pa("ns", "shop", S)], P, None),
    ("root-selector-policy-not-mesh-wide", [pa("sel", ROOT_NAMESPACE, S, {"app": "api"})], P, None),
    ("tie-smallest-name-wins", [pa("b", "prod", P), pa("a", "prod", S)], S, "prod/a"),
]


@pytest.mark.parametrize(("name", "policies", "mode", "source"), CASES, ids=[c[0] for c in CASES])
def test_effective_mode(
    name: str, policies: list[PeerAuthentication], mode: PeerAuthMode, source: str | None
) -> None:
    snap = build_snapshot("node-a", [W, *policies], epoch="e", version=1, trust_bundle=None)
    assert effective_mode(snap, W) is mode
    src = mode_source(snap, W)
    assert (src.key if src else None) == source


def test_root_namespace_workload_uses_root_selector_policy() -> None:
    w = Workload("sys", ROOT_NAMESPACE, "sys", "node-a", ("10.0.1.6",), Labels({"app": "sys"}))
    snap = build_snapshot(
        "node-a",
        [w, pa("sel", ROOT_NAMESPACE, S, {"app": "sys"}), pa("mesh", ROOT_NAMESPACE, P)],
        epoch="e",
        version=1,
        trust_bundle=None,
    )
    assert effective_mode(snap, w) is S
