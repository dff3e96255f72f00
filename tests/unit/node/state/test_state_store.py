"""StateStore: snapshots, deltas, resume points, subscribers, indexes."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api import veil_pb2 as pb
from controller.api.model import (
    ROOT_NAMESPACE,
    AuthorizationPolicy,
    Labels,
    Namespace,
    PolicyAction,
    ResourceType,
    Service,
    ServicePort,
    TrustBundle,
    WatchUpdate,
    Workload,
)
from controller.api.spiffe import InvalidSpiffeId, SpiffeId
from controller.api.wire import resource_to_pb, watch_update_from_pb
from node.errors import StateError
from node.state import StateChange, StateStore, build_snapshot

NODE = "node-a"


def wl(
    name: str,
    ip: str,
    node: str = NODE,
    *,
    enrolled: bool = True,
    ready: bool = True,
    sa: str | None = None,
    labels: dict[str, str] | None = None,
) -> Workload:
    return Workload(name, "default", sa or name, node, (ip,), Labels(labels or {}), enrolled, ready)


A = wl("a", "10.0.1.1")
B = wl("b", "10.0.1.2")
R = wl("r", "10.0.2.1", node="node-b")
SVC = Service("s", "default", ("10.96.0.1",), (ServicePort(80, 8080),), endpoints=("default/r",))
POL = AuthorizationPolicy("p", "default", PolicyAction.DENY)
BUNDLE = TrustBundle("cluster.local", (b"root-1",))


def snapshot(
    version: int, *resources: object, epoch: str = "e1", bundle: TrustBundle | None = BUNDLE
) -> WatchUpdate:
    return WatchUpdate(epoch, version, True, tuple(resources), (), bundle)  # type: ignore[arg-type]


def delta(
    version: int,
    upserts: tuple[object, ...] = (),
    removals: tuple[tuple[ResourceType, str], ...] = (),
    epoch: str = "e1",
    bundle: TrustBundle | None = None,
) -> WatchUpdate:
    return WatchUpdate(epoch, version, False, upserts, removals, bundle)  # type: ignore[arg-type]


def test_starts_unsynced_and_asks_for_a_snapshot() -> None:
    store = StateStore(NODE)
    assert not store.current.synced
    assert store.resume_point() == ("", 0)
    assert store.current.workload_by_ip("10.0.1.1") is None


def test_snapshot_then_deltas_build_indexes() -> None:
    store = StateStore(NODE)
    ch = store.apply(snapshot(5, A, R, SVC, Namespace("default")))
    assert ch is not None and ch.new.synced
    snap = store.current
    assert store.resume_point() == ("e1", 5)
    assert snap.workload_by_ip("10.0.1.1") == A
    assert snap.service_at("10.96.0.1", 80) == (SVC, SVC.ports[0])
    assert snap.service_at("10.96.0.1", 81) is None
    assert snap.is_vip("10.96.0.1") and not snap.is_vip("10.0.1.1")
    assert snap.local_workloads == (A,)
    assert snap.local_identities() == {A.identity}
    assert snap.endpoints(SVC) == (R,)
    assert snap.trust_bundle == BUNDLE

    ch = store.apply(delta(6, (B, POL), ((ResourceType.WORKLOAD, "default/r"),)))
    assert ch is not None
    assert ch.changed == {
        (ResourceType.WORKLOAD, "default/b"),
        (ResourceType.AUTHORIZATION_POLICY, "default/p"),
        (ResourceType.WORKLOAD, "default/r"),
    }
    assert ch.added_local_identities == {B.identity}
    assert ch.affects_authorization
    assert not ch.trust_bundle_changed
    assert store.current.workload_by_ip("10.0.2.1") is None
    assert store.current.endpoints(SVC) == ()  # endpoint key without a workload is skipped
    assert store.current.policies_by_namespace["default"] == (POL,)
    assert store.resume_point() == ("e1", 6)
    # The old snapshot object is untouched: readers holding it see a consistent view.
    assert snap.workload_by_ip("10.0.2.1") == R and snap.version == 5


def test_snapshot_replaces_everything_and_reports_removals() -> None:
    store = StateStore(NODE)
    store.apply(snapshot(1, A, B))
    ch = store.apply(snapshot(1, A, epoch="e2"))
    assert ch is not None
    assert ch.changed == {(ResourceType.WORKLOAD, "default/b")}
    assert ch.removed_local_identities == {B.identity}
    assert store.resume_point() == ("e2", 1)


def test_unchanged_upsert_is_not_a_change() -> None:
    store = StateStore(NODE)
    store.apply(snapshot(1, A))
    ch = store.apply(delta(2, (A,)))
    assert ch is not None and ch.changed == frozenset() and not ch.affects_authorization


def test_delta_before_snapshot_is_rejected() -> None:
    store = StateStore(NODE)
    with pytest.raises(StateError, match="before any snapshot"):
        store.apply(delta(1, (A,)))
    assert not store.current.synced


def test_delta_of_another_epoch_is_rejected_and_state_kept() -> None:
    store = StateStore(NODE)
    store.apply(snapshot(3, A))
    with pytest.raises(StateError, match="epoch"):
        store.apply(delta(4, (B,), epoch="other"))
    assert store.current.version == 3 and store.current.workload_by_ip("10.0.1.2") is None


def test_stale_delta_is_ignored() -> None:
    store = StateStore(NODE)
    store.apply(snapshot(3, A))
    assert store.apply(delta(3, (B,))) is None
    assert store.apply(delta(2, (B,))) is None
    assert store.current.workload_by_ip("10.0.1.2") is None


def test_invalidate_resume_keeps_state_but_asks_for_snapshot() -> None:
    store = StateStore(NODE)
    store.apply(snapshot(3, A))
    store.invalidate_resume()
    assert store.resume_point() == ("", 0)
    assert store.current.workload_by_ip("10.0.1.1") == A  # still serving
    store.apply(snapshot(9, A, epoch="e2"))
    assert store.resume_point() == ("e2", 9)


def test_trust_bundle_kept_across_deltas_and_replaced() -> None:
    store = StateStore(NODE)
    store.apply(snapshot(1, A))
    store.apply(delta(2, (B,)))
    assert store.current.trust_bundle == BUNDLE
    new = TrustBundle("cluster.local", (b"root-1", b"root-2"))
    ch = store.apply(delta(3, bundle=new))
    assert ch is not None and ch.trust_bundle_changed
    assert store.current.trust_bundle == new


def test_subscribers_are_called_after_the_swap_and_isolated() -> None:
    store = StateStore(NODE)
    seen: list[int] = []

    def broken(change: StateChange) -> None:
        raise RuntimeError("boom")

    def good(change: StateChange) -> None:
        assert store.current is change.new  # already swapped in
        seen.append(change.new.version)

    store.subscribe(broken)
    unsubscribe = store.subscribe(good)
    store.apply(snapshot(1, A))
    store.apply(delta(2, (B,)))
    unsubscribe()
    store.apply(delta(3, (R,)))
    assert seen == [1, 2]


async def test_wait_synced() -> None:
    store = StateStore(NODE)
    waiter = asyncio.create_task(store.wait_synced(timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    store.apply(snapshot(1, A))
    snap = await waiter
    assert snap.version == 1
    with pytest.raises(TimeoutError):
        await StateStore(NODE).wait_synced(timeout=0.01)


def test_ip_conflict_prefers_ready_then_smallest_key() -> None:
    old = wl("old", "10.0.1.9", ready=False)
    new = wl("new", "10.0.1.9")
    s = build_snapshot(NODE, [old, new], epoch="e", version=1, trust_bundle=None)
    assert s.workload_by_ip("10.0.1.9") == new
    x = wl("x", "10.0.1.8")
    y = wl("y", "10.0.1.8")
    for order in ([x, y], [y, x]):
        s = build_snapshot(NODE, order, epoch="e", version=1, trust_bundle=None)
        assert s.workload_by_ip("10.0.1.8") == x


def test_local_identities_skip_opted_out() -> None:
    ws = [
        wl("a", "10.0.1.1"),
        wl("optout", "10.0.1.2", enrolled=False),
        wl("remote", "10.0.2.1", node="node-b"),
    ]
    s = build_snapshot(NODE, ws, epoch="e", version=1, trust_bundle=None)
    assert s.local_identities() == {SpiffeId.parse("spiffe://cluster.local/ns/default/sa/a")}
    assert s.local_workload_by_ip("10.0.1.2") is None
    assert s.local_workload_by_ip("10.0.2.1") is None
    assert s.local_workload_by_ip("10.0.1.1") == ws[0]


def test_workload_identity_is_derived_once_and_invalid_ones_are_refused() -> None:
    # A workload carries its parsed identity; one that cannot have an identity
    # is refused when it is built, so no snapshot ever holds one.
    a = wl("a", "10.0.1.1")
    assert a.identity == SpiffeId.parse("spiffe://cluster.local/ns/default/sa/a")
    assert a.identity is wl("a2", "10.0.1.9", sa="a").identity  # memoised: one shared object
    with pytest.raises(InvalidSpiffeId, match="service account"):
        wl("bad", "10.0.1.3", sa="Bad_SA")


def test_decode_turns_a_workload_without_identity_into_a_removal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    msg = pb.WatchResponse(epoch="e", version=2, snapshot=False)
    msg.upserts.add().workload.CopyFrom(
        pb.Workload(
            name="bad",
            namespace="default",
            service_account="Bad_SA",
            node=NODE,
            ips=["10.0.1.3"],
            enrolled=True,
            ready=True,
            trust_domain="cluster.local",
        )
    )
    msg.upserts.append(resource_to_pb(B))
    with caplog.at_level("ERROR", logger="veil.api.wire"):
        update = watch_update_from_pb(msg)
    assert update.upserts == (B,)
    assert update.removals == ((ResourceType.WORKLOAD, "default/bad"),)
    assert "default/bad" in caplog.text and "no valid identity" in caplog.text
    # An older, valid copy of that workload does not survive the update.
    store = StateStore(NODE)
    store.apply(WatchUpdate("e", 1, True, (A, wl("bad", "10.0.1.3"))))
    store.apply(update)
    assert set(store.current.workloads) == {"default/a", "default/b"}


def test_policies_are_compiled_and_ordered_when_the_snapshot_is_built() -> None:
    allow_b = AuthorizationPolicy("b-allow", "default", PolicyAction.ALLOW)
    deny_z = AuthorizationPolicy("z-deny", "default", PolicyAction.DENY)
    deny_a = AuthorizationPolicy(
        "a-deny", "default", PolicyAction.DENY, selector=Labels({"app": "other"})
    )
    mesh = AuthorizationPolicy("mesh", ROOT_NAMESPACE, PolicyAction.DENY)
    a = wl("a", "10.0.1.1")
    s = build_snapshot(
        NODE, [a, R, allow_b, deny_z, deny_a, mesh], epoch="e", version=1, trust_bundle=None
    )
    pset = s.policy_set_for(a)
    assert [p.key for p in pset.deny] == ["default/z-deny", f"{ROOT_NAMESPACE}/mesh"]
    assert [p.key for p in pset.allow] == ["default/b-allow"]
    assert s.policy_set_for(a) is pset  # held by the snapshot, not rebuilt per call
    assert s.policies_for(a) == (allow_b, deny_z, mesh)
    # Another node's workload is answered too (computed, same rules).
    assert [p.key for p in s.policy_set_for(R).deny] == ["default/z-deny", f"{ROOT_NAMESPACE}/mesh"]


def test_unchanged_policies_keep_their_compiled_form_across_updates() -> None:
    store = StateStore(NODE)
    store.apply(WatchUpdate("e", 1, True, (A, POL)))
    first = store.current.compiled_policies[POL.key]
    store.apply(WatchUpdate("e", 2, False, (B,)))
    assert store.current.compiled_policies[POL.key] is first
    changed = AuthorizationPolicy("p", "default", PolicyAction.ALLOW)
    store.apply(WatchUpdate("e", 3, False, (changed,)))
    assert store.current.compiled_policies[POL.key] is not first
    assert store.current.compiled_policies[POL.key].action is PolicyAction.ALLOW


def test_trust_domain_follows_the_bundle() -> None:
    s = build_snapshot(
        NODE, [], epoch="e", version=1, trust_bundle=TrustBundle("example.org", (b"r",))
    )
    assert s.trust_domain == "example.org"


_POOL = [wl(f"w{i}", f"10.0.{i % 3}.{i}", node=NODE if i % 2 else "node-b") for i in range(8)]
_POOL += [
    Workload(f"w{i}", "default", f"w{i}", NODE, (f"10.0.9.{i}",), Labels({"v": "2"}), True)
    for i in range(4)
]
_KEYS = sorted({w.key for w in _POOL})


@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(_POOL), max_size=4),
            st.lists(st.sampled_from(_KEYS), max_size=3),
        ),
        max_size=12,
    )
)
def test_deltas_reach_the_same_state_as_a_snapshot(
    steps: list[tuple[list[Workload], list[str]]],
) -> None:
    """Model check: any sequence of deltas equals one snapshot of the final resource set."""
    store = StateStore(NODE)
    store.apply(snapshot(1))
    model: dict[str, Workload] = {}
    for i, (ups, rms) in enumerate(steps, start=2):
        removals = tuple((ResourceType.WORKLOAD, k) for k in rms if k not in {u.key for u in ups})
        store.apply(delta(i, tuple(ups), removals))
        for u in ups:
            model[u.key] = u
        for _, k in removals:
            model.pop(k, None)
    fresh = build_snapshot(
        NODE, model.values(), epoch="e1", version=len(steps) + 1, trust_bundle=BUNDLE
    )
    got = store.current
    assert dict(got.workloads) == dict(fresh.workloads)
    assert dict(got.by_ip) == dict(fresh.by_ip)
    assert got.local_workloads == fresh.local_workloads
    assert got.local_identities() == fresh.local_identities()
    # Resuming is always from the last applied version.
    assert store.resume_point() == ("e1", len(steps) + 1)
