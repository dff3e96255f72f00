"""Table tests of request-path normalisation (node.policy.path), including the
known bypass forms against a DENY on ``/admin*``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api.model import AuthorizationPolicy, Operation, PolicyAction, Rule
from node.policy import (
    BadPath,
    L7PolicySet,
    RequestFacts,
    evaluate_request,
    normalize_path,
    normalize_target,
)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("/", "/"),
        ("/pay", "/pay"),
        ("/./admin", "/admin"),
        ("//admin", "/admin"),
        ("///admin//x", "/admin/x"),
        ("/%61dmin", "/admin"),
        ("/%2e/admin", "/admin"),
        ("/%2E%2E/admin", "/admin"),
        ("/public/../admin", "/admin"),
        ("/../../admin", "/admin"),
        ("/a/b/./../c", "/a/c"),
        ("/admin/", "/admin/"),
        ("/admin/.", "/admin/"),
        ("/admin/x/..", "/admin/"),
        ("/a%7eb", "/a~b"),
        ("/a%20b", "/a%20b"),
        ("/a%3f", "/a%3F"),
        ("/ADMIN", "/ADMIN"),  # case is kept (Istio matches paths case-sensitively)
        ("/admin..;x", "/admin..;x"),  # not a dot segment: a literal one
    ],
)
def test_normalize(raw: str, want: str) -> None:
    assert normalize_path(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        "/admin%2Fx",
        "/admin%2fx",
        "/a%5Cb",
        "/a%5cb",
        "/a\\b",
        "/admin/..;/",
        "/public/..;/admin",
        "/.;x/admin",
        "/a%zz",
        "/a%4",
        "admin",
        "",
        "/a b",
        "/a\x00",
        "/é",
    ],
)
def test_rejected(raw: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(raw)


def test_target_keeps_query() -> None:
    t = normalize_target("/./pay?x=%2F&y=1")
    assert (t.path, t.query, t.target) == ("/pay", "x=%2F&y=1", "/pay?x=%2F&y=1")
    with pytest.raises(BadPath):
        normalize_target("/pay#frag")


DENY_ADMIN = L7PolicySet.compile(
    [
        AuthorizationPolicy(
            "deny-admin", "shop", PolicyAction.DENY,
            rules=(Rule(operations=(Operation(paths=("/admin*",)),)),),
        )
    ]
)  # fmt: skip


def _verdict(raw: str) -> str:
    try:
        path = normalize_target(raw).path
    except BadPath:
        return "400"
    v = evaluate_request(RequestFacts("GET", "payments", path, 8080), DENY_ADMIN)
    return "allow" if v.allowed else "403"


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("/admin", "403"),
        ("/./admin", "403"),
        ("//admin", "403"),
        ("/%61dmin", "403"),
        ("/%2e%2e/admin", "403"),
        ("/pay/../admin", "403"),
        ("/admin/", "403"),  # trailing slash: still under the prefix
        ("/admin/..;/", "400"),  # dot segment with parameters
        ("/pay/..;/admin", "400"),
        ("/admin%2Fx", "400"),
        ("/ADMIN", "allow"),  # case-sensitive, as Istio: documented in docs/waypoint.md
        ("/pay", "allow"),
    ],
)
def test_bypass_forms_against_deny_admin(raw: str, want: str) -> None:
    assert _verdict(raw) == want


@given(st.text(alphabet="/.%2aAdminF;\\fe5c", max_size=24))
def test_normalised_paths_are_fixed_points(raw: str) -> None:
    """Whatever is accepted normalises to a path that normalises to itself (what
    is matched is what is forwarded), and nothing but BadPath is raised."""
    try:
        once = normalize_path(raw)
    except BadPath:
        return
    assert once.startswith("/")
    assert "//" not in once
    assert normalize_path(once) == once
