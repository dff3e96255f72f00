"""classify_failure and not_served: what a failed list/watch is reported as."""

from __future__ import annotations

import pytest

from controller.health import HealthCheck, HealthState
from controller.k8s.availability import (
    FORBIDDEN_STREAK,
    SERVER_ERROR_STREAK,
    classify_failure,
    not_served,
)
from controller.k8s.errors import KubernetesError
from controller.k8s.kinds import (
    AUTHORIZATION_POLICIES,
    ENDPOINT_SLICES,
    OPTIONAL_KINDS,
    PODS,
    REQUIRED_KINDS,
    SERVICES,
    WATCHED_KINDS,
    understood_versions,
)


def test_required_and_optional_kinds_split_the_watched_ones() -> None:
    assert set(WATCHED_KINDS) == REQUIRED_KINDS | OPTIONAL_KINDS
    assert {SERVICES, ENDPOINT_SLICES} == OPTIONAL_KINDS
    assert understood_versions(ENDPOINT_SLICES) == ("v1", "v1beta1")
    assert understood_versions(PODS) == ("v1",)


def test_forbidden_names_the_verb_resource_and_group_from_the_second_in_a_row() -> None:
    err = KubernetesError("GET /apis/discovery.k8s.io/v1/endpointslices: forbidden", status=403)
    assert classify_failure(ENDPOINT_SLICES, "watch", err, FORBIDDEN_STREAK - 1) is None
    failure = classify_failure(ENDPOINT_SLICES, "watch", err, FORBIDDEN_STREAK)
    assert failure is not None
    assert "verb 'watch' on resource 'endpointslices' in API group 'discovery.k8s.io'" in (
        failure.cause
    )
    assert "ClusterRole veil-controller" in failure.hint
    assert "CRDs" not in failure.hint


def test_not_served_says_which_versions_and_how_to_fix() -> None:
    crd = not_served(AUTHORIZATION_POLICIES, ())
    assert "security.veil.io/v1 authorizationpolicies" in crd.message
    assert crd.hint is not None and "install the Veil CRDs" in crd.hint
    slices = not_served(ENDPOINT_SLICES, ("v2",))
    assert "discovery.k8s.io/v1 or discovery.k8s.io/v1beta1" in slices.message
    assert "offered: v2" in slices.message
    failure = classify_failure(ENDPOINT_SLICES, "list", slices, 1)
    assert failure is not None and failure.cause == slices.message


@pytest.mark.parametrize("status", [0, 500, 503])
def test_server_errors_count_only_as_a_streak(status: int) -> None:
    err = KubernetesError("GET /api/v1/pods: boom", status=status)
    for streak in range(1, SERVER_ERROR_STREAK):
        assert classify_failure(PODS, "list", err, streak) is None
    failure = classify_failure(PODS, "list", err, SERVER_ERROR_STREAK)
    assert failure is not None and "3 times in a row" in failure.cause


def test_gone_and_throttling_are_never_failures() -> None:
    for status in (410, 429):
        err = KubernetesError("x", status=status)
        assert classify_failure(PODS, "watch", err, 10) is None


def test_health_is_ready_only_when_serving_with_every_required_check() -> None:
    state = HealthState()
    checks = [
        HealthCheck("pods", True, True, "synced"),
        HealthCheck("services", False, False, "failed"),
    ]
    state.checks = lambda: checks
    assert state.report()["ready"] is False  # still starting
    state.set_phase("serving", "listeners open")
    report = state.report()
    assert report["ready"] is True and report["degraded"] is True
    checks[0] = HealthCheck("pods", False, True, "failed", "forbidden")
    assert state.report()["ready"] is False
