"""Watch-event parsing and the object cache, without sockets."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.k8s.kinds import AUTHORIZATION_POLICIES, NAMESPACES, PODS, TOKEN_REVIEWS
from controller.k8s.watch import (
    ApplyResult,
    EventType,
    ObjectCache,
    WatchEvent,
    WatchProtocolError,
    object_key,
    parse_watch_line,
)


def pod(name: str, rv: str, ns: str = "shop", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv, **extra}}


def line(etype: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": etype, "object": obj}).encode()


@pytest.mark.parametrize(
    ("raw", "etype"),
    [
        (line("ADDED", pod("a", "1")), EventType.ADDED),
        (line("MODIFIED", pod("a", "2")), EventType.MODIFIED),
        (line("DELETED", pod("a", "3")), EventType.DELETED),
        (
            line("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "9"}}),
            EventType.BOOKMARK,
        ),
        (line("ERROR", {"kind": "Status", "code": 410, "reason": "Expired"}), EventType.ERROR),
    ],
)
def test_parse_valid_events(raw: bytes, etype: EventType) -> None:
    assert parse_watch_line(raw).type is etype


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"type": "ADDED"}',
        b'{"object": {}}',
        line("SOMETHING", pod("a", "1")),
        line("ADDED", {"metadata": {"namespace": "x"}}),  # no name
        line("ADDED", {"metadata": "nope"}),
        line("BOOKMARK", {"metadata": {}}),  # bookmark without a version
        b"\xff\xfe",
    ],
)
def test_parse_refuses_malformed_lines(raw: bytes) -> None:
    with pytest.raises(WatchProtocolError):
        parse_watch_line(raw)


@given(st.binary(max_size=512))
def test_parse_arbitrary_bytes_only_raises_protocol_error(data: bytes) -> None:
    with contextlib.suppress(WatchProtocolError):
        parse_watch_line(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(
    st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR", "X"]),
    st.dictionaries(st.sampled_from(["metadata", "code", "kind"]), json_values, max_size=3),
)
def test_parse_and_apply_fuzzed_events_never_crash(etype: str, obj: dict[str, Any]) -> None:
    """Whatever a server sends, the cache either applies it or refuses it cleanly."""
    cache = ObjectCache()
    try:
        event = parse_watch_line(line(etype, obj))
    except WatchProtocolError:
        return
    assert cache.apply(event) in ApplyResult


def test_error_event_status_code() -> None:
    gone = parse_watch_line(line("ERROR", {"kind": "Status", "code": 410}))
    assert gone.status_code == 410
    odd = parse_watch_line(line("ERROR", {"kind": "Status", "code": True}))
    assert odd.status_code == 0


def ev(etype: EventType, obj: dict[str, Any]) -> WatchEvent:
    return WatchEvent(etype, obj)


def test_cache_apply_table() -> None:
    cache = ObjectCache()
    assert cache.replace([pod("a", "5")], "10")
    steps = [
        (ev(EventType.ADDED, pod("b", "11")), ApplyResult.CHANGED, {"a", "b"}, "11"),
        # A replay of the same version (after a reconnect) changes nothing.
        (ev(EventType.ADDED, pod("b", "11")), ApplyResult.UNCHANGED, {"a", "b"}, "11"),
        (ev(EventType.MODIFIED, pod("a", "12")), ApplyResult.CHANGED, {"a", "b"}, "12"),
        (
            ev(EventType.BOOKMARK, {"metadata": {"resourceVersion": "20"}}),
            ApplyResult.UNCHANGED,
            {"a", "b"},
            "20",
        ),
        (ev(EventType.DELETED, pod("a", "21")), ApplyResult.CHANGED, {"b"}, "21"),
        (ev(EventType.DELETED, pod("a", "21")), ApplyResult.UNCHANGED, {"b"}, "21"),
        (ev(EventType.ERROR, {"code": 410}), ApplyResult.RELIST, {"b"}, "21"),
        (ev(EventType.ERROR, {"code": 500}), ApplyResult.RESTART, {"b"}, "21"),
    ]
    for event, result, names, rv in steps:
        assert cache.apply(event) is result, event
        assert {k[1] for k in cache.object_keys()} == names
        assert cache.resource_version == rv


def test_replace_after_gone_loses_nothing_and_duplicates_nothing() -> None:
    cache = ObjectCache()
    cache.replace([pod("a", "1"), pod("b", "2")], "2")
    # While the watch was away: b deleted, c created, a modified.
    assert cache.replace([pod("a", "7"), pod("c", "8"), pod("c", "8")], "9")
    assert sorted(k[1] for k in cache.object_keys()) == ["a", "c"]
    assert cache.get(("shop", "a"))["metadata"]["resourceVersion"] == "7"  # type: ignore[index]
    assert cache.resource_version == "9"
    # The same list again is not a change.
    assert not cache.replace([pod("a", "7"), pod("c", "8")], "10")


def test_first_replace_counts_as_change_even_when_empty() -> None:
    cache = ObjectCache()
    assert cache.replace([], "1")
    assert cache.synced


def test_managed_fields_are_dropped() -> None:
    cache = ObjectCache()
    cache.apply(ev(EventType.ADDED, pod("a", "1", managedFields=[{"big": "x" * 100}])))
    assert "managedFields" not in cache.get(("shop", "a"))["metadata"]  # type: ignore[index]


def test_object_key() -> None:
    assert object_key({"metadata": {"name": "shop"}}) == ("", "shop")
    assert object_key(pod("a", "1")) == ("shop", "a")


@pytest.mark.parametrize(
    ("kind", "ns", "name", "sub", "path"),
    [
        (PODS, None, None, "", "/api/v1/pods"),
        (PODS, "shop", None, "", "/api/v1/namespaces/shop/pods"),
        (PODS, "shop", "a", "", "/api/v1/namespaces/shop/pods/a"),
        (NAMESPACES, None, "shop", "", "/api/v1/namespaces/shop"),
        (
            AUTHORIZATION_POLICIES,
            "shop",
            "p",
            "status",
            "/apis/security.veil.io/v1/namespaces/shop/authorizationpolicies/p/status",
        ),
        (TOKEN_REVIEWS, None, None, "", "/apis/authentication.k8s.io/v1/tokenreviews"),
    ],
)
def test_paths(kind: Any, ns: str | None, name: str | None, sub: str, path: str) -> None:
    if name is None:
        assert kind.collection_path(ns) == path
    else:
        assert kind.object_path(ns, name, sub) == path


def test_namespaced_object_path_needs_namespace() -> None:
    with pytest.raises(ValueError):
        PODS.object_path(None, "a")
