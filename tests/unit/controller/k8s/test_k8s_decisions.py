"""Pure decisions of Kubernetes mode: status patches, lease election, token checks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api.errors import ApiError
from controller.k8s.backoff import Backoff
from controller.k8s.convert import PolicyVerdict
from controller.k8s.kinds import AUTHORIZATION_POLICIES
from controller.k8s.leader import LeaseAction, LeaseRecord, LeaseTiming, decide
from controller.k8s.status import status_patch
from controller.k8s.tokenreview import (
    NODE_NAME_CLAIM,
    POD_NAME_CLAIM,
    POD_UID_CLAIM,
    BoundPod,
    check_review,
    node_of_pod,
)

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

# -- status ----------------------------------------------------------------------------


def obj(
    generation: int = 2, conditions: list[dict[str, Any]] | None = None, observed: int | None = None
) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if conditions is not None:
        status["conditions"] = conditions
    if observed is not None:
        status["observedGeneration"] = observed
    return {
        "metadata": {
            "name": "p",
            "namespace": "shop",
            "generation": generation,
            "resourceVersion": "77",
        },
        "status": status,
    }


def verdict(error: str | None = None, generation: int = 2) -> PolicyVerdict:
    return PolicyVerdict(AUTHORIZATION_POLICIES, "shop", "p", generation, error)


def test_invalid_policy_gets_accepted_false_with_reason() -> None:
    patch = status_patch(obj(), verdict("bad CIDR"), NOW)
    assert patch is not None
    assert patch["metadata"]["resourceVersion"] == "77"
    (cond,) = patch["status"]["conditions"]
    assert cond == {
        "type": "Accepted",
        "status": "False",
        "reason": "Invalid",
        "message": "bad CIDR",
        "observedGeneration": 2,
        "lastTransitionTime": "2024-05-01T12:00:00Z",
    }
    assert patch["status"]["observedGeneration"] == 2


def test_no_patch_when_status_already_matches() -> None:
    first = status_patch(obj(), verdict(), NOW)
    assert first is not None
    written = obj(conditions=first["status"]["conditions"], observed=2)
    assert status_patch(written, verdict(), NOW) is None


def test_transition_time_kept_while_status_holds_and_other_conditions_kept() -> None:
    other = {
        "type": "Other",
        "status": "True",
        "reason": "X",
        "message": "",
        "lastTransitionTime": "2020-01-01T00:00:00Z",
    }
    previous = {
        "type": "Accepted",
        "status": "False",
        "reason": "Invalid",
        "message": "old",
        "observedGeneration": 1,
        "lastTransitionTime": "2023-01-01T00:00:00Z",
    }
    patch = status_patch(obj(conditions=[other, previous], observed=1), verdict("new"), NOW)
    assert patch is not None
    conds = patch["status"]["conditions"]
    assert conds[0] == other
    assert conds[1]["lastTransitionTime"] == "2023-01-01T00:00:00Z"
    assert conds[1]["message"] == "new"
    # Becoming valid is a transition.
    patch = status_patch(obj(conditions=[previous], observed=1), verdict(), NOW)
    assert patch is not None
    assert patch["status"]["conditions"][0]["lastTransitionTime"] == "2024-05-01T12:00:00Z"


def test_stale_verdict_is_not_written() -> None:
    assert status_patch(obj(generation=3), verdict(generation=2), NOW) is None


def test_huge_message_is_truncated() -> None:
    patch = status_patch(obj(), verdict("x" * 40000), NOW)
    assert patch is not None and len(patch["status"]["conditions"][0]["message"]) == 32768


# -- leader election ----------------------------------------------------------------------


def rec(holder: str, duration: int = 15) -> LeaseRecord:
    return LeaseRecord(
        holder=holder, lease_duration=duration, renew_time="t", transitions=0, resource_version="1"
    )


@pytest.mark.parametrize(
    ("record", "age", "action"),
    [
        (None, 0.0, LeaseAction.CREATE),
        (rec("me"), 100.0, LeaseAction.RENEW),
        (rec("other"), 3.0, LeaseAction.WAIT),
        (rec("other"), 15.0, LeaseAction.WAIT),
        (rec("other"), 15.1, LeaseAction.ACQUIRE),
        (rec(""), 0.0, LeaseAction.ACQUIRE),  # released
        (rec("other", duration=1), 1.5, LeaseAction.ACQUIRE),
    ],
)
def test_decide(record: LeaseRecord | None, age: float, action: LeaseAction) -> None:
    assert decide(record, "me", age) is action


def test_lease_record_from_json_defaults() -> None:
    r = LeaseRecord.from_json({"metadata": {"resourceVersion": "5"}, "spec": {}})
    assert (r.holder, r.lease_duration, r.transitions, r.resource_version) == ("", 15, 0, "5")


def test_lease_timing_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        LeaseTiming(lease_duration=5, renew_deadline=10, retry_period=2)


def test_backoff_doubles_to_cap_and_resets() -> None:
    b = Backoff(initial=1.0, cap=4.0, jitter=0.0)
    assert [b.next_delay() for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    b.reset()
    assert b.next_delay() == 1.0


# -- TokenReview -----------------------------------------------------------------------------


def review(
    authenticated: bool = True,
    username: str = "system:serviceaccount:veil-system:veil-node",
    extra: dict[str, list[str]] | None = None,
    audiences: list[str] | None = None,
    error: str = "",
) -> dict[str, Any]:
    status: dict[str, Any] = {"authenticated": authenticated}
    if error:
        status["error"] = error
    if authenticated:
        status["user"] = {
            "username": username,
            "extra": extra
            if extra is not None
            else {POD_NAME_CLAIM: ["veil-node-abc"], POD_UID_CLAIM: ["uid-1"]},
        }
        status["audiences"] = audiences if audiences is not None else ["veil"]
    return {"status": status}


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (
            review(False, error="[invalid bearer token, service account token has expired]"),
            "expired",
        ),
        (review(audiences=["https://kubernetes.default.svc"]), "audiences"),
        (
            review(username="system:serviceaccount:shop:default"),
            "not the Veil node service account",
        ),
        (review(extra={}), "not bound to a pod"),
        (review(extra={POD_NAME_CLAIM: ["a", "b"], POD_UID_CLAIM: ["u"]}), "not bound to a pod"),
        ({}, "not authenticated"),
    ],
)
def test_check_review_refusals(answer: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ApiError) as err:
        check_review(answer, "veil-system", "veil-node")
    assert err.value.code == "UNAUTHENTICATED"
    assert fragment in err.value.message


def test_check_review_accepts_bound_token() -> None:
    bound = check_review(
        review(extra={POD_NAME_CLAIM: ["p"], POD_UID_CLAIM: ["u"], NODE_NAME_CLAIM: ["node-a"]}),
        "veil-system",
        "veil-node",
    )
    assert bound == BoundPod("veil-system", "veil-node", "p", "u", "node-a")


def k8s_pod(
    uid: str = "u", sa: str = "veil-node", node: str = "node-a", phase: str = "Running"
) -> dict[str, Any]:
    return {
        "metadata": {"uid": uid},
        "spec": {"serviceAccountName": sa, "nodeName": node},
        "status": {"phase": phase},
    }


BOUND = BoundPod("veil-system", "veil-node", "p", "u", "")


@pytest.mark.parametrize(
    ("pod", "bound", "result"),
    [
        (k8s_pod(), BOUND, "node-a"),
        (None, BOUND, "no longer exists"),
        (k8s_pod(uid="other"), BOUND, "earlier pod"),
        (k8s_pod(sa="default"), BOUND, "runs as service account default"),
        (k8s_pod(phase="Succeeded"), BOUND, "finished"),
        (k8s_pod(node=""), BOUND, "not scheduled"),
        (
            k8s_pod(),
            BoundPod("veil-system", "veil-node", "p", "u", "node-b"),
            "token says node node-b",
        ),
        (k8s_pod(), BoundPod("veil-system", "veil-node", "p", "u", "node-a"), "node-a"),
    ],
)
def test_node_of_pod(pod: dict[str, Any] | None, bound: BoundPod, result: str) -> None:
    if result.startswith("node-"):
        assert node_of_pod(pod, bound) == result
    else:
        with pytest.raises(ApiError) as err:
            node_of_pod(pod, bound)
        assert err.value.code == "UNAUTHENTICATED"
        assert result in err.value.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
review_like = st.fixed_dictionaries(
    {},
    optional={
        "status": st.fixed_dictionaries(
            {},
            optional={
                "authenticated": st.booleans() | json_values,
                "error": json_values,
                "audiences": st.lists(st.sampled_from(["veil", "other"]), max_size=2) | json_values,
                "user": st.fixed_dictionaries(
                    {},
                    optional={
                        "username": st.sampled_from(
                            ["system:serviceaccount:veil-system:veil-node", "x"]
                        )
                        | json_values,
                        "extra": st.dictionaries(
                            st.sampled_from([POD_NAME_CLAIM, POD_UID_CLAIM, NODE_NAME_CLAIM]),
                            st.lists(st.text(max_size=5), max_size=2) | json_values,
                        )
                        | json_values,
                    },
                )
                | json_values,
            },
        )
        | json_values
    },
)


@given(
    review_like,
    st.one_of(
        st.none(), st.dictionaries(st.sampled_from(["metadata", "spec", "status"]), json_values)
    ),
)
def test_token_checks_on_arbitrary_answers_only_refuse_cleanly(review: Any, pod: Any) -> None:
    """Whatever the API server answers, the result is a node name or an ApiError."""
    try:
        bound = check_review(review, "veil-system", "veil-node")
        node = node_of_pod(pod, bound)
    except ApiError as e:
        assert e.code == "UNAUTHENTICATED"
        return
    assert isinstance(node, str) and node


@given(
    st.dictionaries(st.sampled_from(["metadata", "status", "spec"]), json_values),
    st.none() | st.text(max_size=20),
)
def test_status_patch_on_arbitrary_objects(obj: dict[str, Any], error: str | None) -> None:
    patch = status_patch(obj, verdict(error, generation=2), NOW)
    if patch is not None:
        assert patch["status"]["conditions"][-1]["type"] == "Accepted"
