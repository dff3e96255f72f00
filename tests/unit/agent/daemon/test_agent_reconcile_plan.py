"""The enrollment reconciler: desired pods from the registry, and plan() against the kernel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.bpf import AttachedProgram, PodCounters, PodDataplaneState
from agent.daemon.reconcile import (
    Action,
    DesiredPod,
    Enroll,
    MarkLocal,
    Refresh,
    Unenroll,
    VethLookup,
    describe,
    desired_pods,
    plan,
)
from agent.net.tc import Hook
from controller.api.model import Workload

IN = AttachedProgram("veil_pod_ingress", Hook.INGRESS, 11)
EG = AttachedProgram("veil_pod_egress", Hook.EGRESS, 12)
OLD_IN = AttachedProgram("veil_pod_ingress", Hook.INGRESS, 7)
PROGRAMS = {"pod_ingress": 11, "pod_egress": 12, "uplink_ingress": 13}
A = IPv4Address("10.244.1.10")
B = IPv4Address("10.244.1.11")


def want(
    key: str = "shop/a",
    ip: IPv4Address = A,
    enrolled: bool = True,
    ifindex: int | None = 5,
) -> DesiredPod:
    return DesiredPod(
        key,
        ip,
        enrolled,
        ifindex,
        None if ifindex is None else f"vh{ifindex}",
        "no route to pod" if ifindex is None else None,
    )


def have(
    ip: IPv4Address = A,
    ifindex: int = 5,
    enrolled: bool = True,
    ingress: AttachedProgram | None = IN,
    egress: AttachedProgram | None = EG,
    ifname: str | None = "",
) -> PodDataplaneState:
    return PodDataplaneState(
        ip,
        ifindex,
        f"vh{ifindex}" if ifname == "" else ifname,
        enrolled,
        ingress,
        egress,
        PodCounters(),
    )


def kinds(actions: Sequence[Action]) -> list[tuple[str, str]]:
    out = []
    for a in actions:
        if isinstance(a, Unenroll):
            out.append(("Unenroll", f"{a.ip}@{a.ifindex}"))
        else:
            out.append((type(a).__name__, a.pod.key))
    return out


CASES = [
    ("nothing anywhere", [], [], []),
    ("new enrolled pod", [want()], [], [("Enroll", "shop/a")]),
    ("new pod outside the mesh", [want(enrolled=False)], [], [("MarkLocal", "shop/a")]),
    ("enrolled and in sync", [want()], [have()], []),
    (
        "tracked and in sync",
        [want(enrolled=False)],
        [have(enrolled=False, egress=None)],
        [],
    ),
    (
        "namespace label added",
        [want()],
        [have(enrolled=False, egress=None)],
        [("Enroll", "shop/a")],
    ),
    (
        "namespace label removed",
        [want(enrolled=False)],
        [have()],
        [("MarkLocal", "shop/a")],
    ),
    ("egress guard detached", [want()], [have(egress=None)], [("Enroll", "shop/a")]),
    ("ingress detached", [want()], [have(ingress=None)], [("Enroll", "shop/a")]),
    ("filter runs an old program", [want()], [have(ingress=OLD_IN)], [("Enroll", "shop/a")]),
    (
        "tracked pod with an egress guard",
        [want(enrolled=False)],
        [have(enrolled=False)],
        [("MarkLocal", "shop/a")],
    ),
    ("pod deleted", [], [have()], [("Unenroll", f"{A}@5")]),
    (
        "pod recreated on a new veth",
        [want(ifindex=9)],
        [have(ifindex=5, ifname=None)],
        [("Refresh", "shop/a")],
    ),
    ("veth not there yet", [want(ifindex=None)], [], [("AwaitVeth", "shop/a")]),
    (
        "veth gone, pod still in the registry",
        [want(ifindex=None)],
        [have(ifname=None)],
        [("Unenroll", f"{A}@5"), ("AwaitVeth", "shop/a")],
    ),
    (
        "route lookup failed but the veth still exists: keep it (fail closed)",
        [want(ifindex=None)],
        [have()],
        [("AwaitVeth", "shop/a")],
    ),
    (
        "ifindex reused by a new pod: no unenroll of the old address",
        [want("shop/b", B, ifindex=5)],
        [have(A, ifindex=5)],
        [("Enroll", "shop/b")],
    ),
    (
        "removals come before enrollments",
        [want("shop/b", B, ifindex=6)],
        [have(A, ifindex=5)],
        [("Unenroll", f"{A}@5"), ("Enroll", "shop/b")],
    ),
    (
        "two workloads claim one address: the first key wins",
        [want("shop/z", A, enrolled=False), want("shop/a", A)],
        [],
        [("Enroll", "shop/a")],
    ),
]


@pytest.mark.parametrize(
    ("desired", "actual", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan(
    desired: list[DesiredPod], actual: list[PodDataplaneState], expected: list[tuple[str, str]]
) -> None:
    assert kinds(plan(desired, actual, programs=PROGRAMS)) == expected


def test_refresh_names_stale_veths_and_mode() -> None:
    [action] = plan([want(ifindex=9, enrolled=False)], [have(ifindex=5, ifname=None)])
    assert isinstance(action, Refresh)
    assert action.stale_ifindexes == (5,)
    assert not action.pod.enrolled
    assert "again on vh9" in describe(action)


def test_program_ids_ignored_without_expectation() -> None:
    assert plan([want()], [have(ingress=OLD_IN)]) == []


def test_reasons_are_readable() -> None:
    [action] = plan([want(enrolled=False)], [have()])
    assert isinstance(action, MarkLocal)
    assert "registry says not enrolled" in action.reason
    [action] = plan([want()], [have(egress=None)])
    assert isinstance(action, Enroll)
    assert action.reason == "egress guard missing"


def wl(name: str, ips: tuple[str, ...], node: str = "node-a", enrolled: bool = True) -> Workload:
    return Workload(name, "shop", "sa", node, ips, enrolled=enrolled)


def test_desired_pods_takes_local_ipv4_and_looks_up_veths() -> None:
    veths: dict[IPv4Address | IPv6Address, VethLookup] = {A: VethLookup.found(5, "vh5")}

    def lookup(ip: IPv4Address | IPv6Address) -> VethLookup:
        return veths.get(ip, VethLookup.missing(f"no route to pod {ip}"))

    state = desired_pods(
        [
            wl("a", ("10.244.1.10", "fd00::1")),
            wl("b", ("10.244.1.11",), enrolled=False),
            wl("remote", ("10.244.2.10",), node="node-b"),
        ],
        "node-a",
        lookup,
    )
    assert state.pods == (
        DesiredPod("shop/a", A, True, 5, "vh5", ipv6=(IPv6Address("fd00::1"),)),
        DesiredPod("shop/b", B, False, None, None, f"no route to pod {B}"),
    )
    assert state.ignored == ()


def test_desired_pods_enrolls_ipv6_only_and_reports_unusable_addresses() -> None:
    state = desired_pods(
        [
            wl("v6only", ("fd00::2",)),
            wl("ll", ("10.244.1.10", "fe80::1", "fd00::3", "::ffff:10.244.1.10")),
        ],
        "node-a",
        lambda ip: VethLookup.found(5, "vh5"),
    )
    assert [(p.key, p.ip, p.ipv6) for p in state.pods] == [
        ("shop/ll", A, (IPv6Address("fd00::3"),)),
        ("shop/v6only", IPv6Address("fd00::2"), (IPv6Address("fd00::2"),)),
    ]
    assert not any("v6only" in line for line in state.ignored)
    assert any("fe80::1" in line for line in state.ignored)


def test_plan_reenrolls_when_the_ipv6_addresses_change() -> None:
    d = DesiredPod("shop/a", A, True, 5, "vh5", ipv6=(IPv6Address("fd00::1"),))
    current = have(A, 5)
    (action,) = plan([d], [current])
    assert isinstance(action, Enroll)
    assert "IPv6" in action.reason
    assert plan([d], [replace(current, ipv6=d.ipv6)]) == []


def test_desired_pods_defers_to_the_snapshot_owner_of_an_address() -> None:
    old = wl("old", ("10.244.1.10",))
    new = wl("new", ("10.244.1.10",))
    state = desired_pods(
        [old, new], "node-a", lambda ip: VethLookup.found(5, "vh5"), owner_of=lambda ip: new
    )
    assert [p.key for p in state.pods] == ["shop/new"]
    assert "shop/new, which wins" in state.ignored[0]


ips = st.integers(min_value=1, max_value=250).map(lambda n: IPv4Address(f"10.1.0.{n}"))


@st.composite
def desired_sets(draw: st.DrawFn) -> list[DesiredPod]:
    chosen = draw(st.lists(ips, unique=True, max_size=12))
    return [
        DesiredPod(f"ns/p{i}", ip, draw(st.booleans()), 100 + i, f"vh{100 + i}")
        for i, ip in enumerate(chosen)
    ]


@given(desired_sets())
def test_plan_from_scratch_touches_every_pod_once(desired: list[DesiredPod]) -> None:
    actions = plan(desired, [])
    assert sorted(a.pod.key for a in actions) == sorted(d.key for d in desired)  # type: ignore[union-attr]
    for a in actions:
        assert isinstance(a, Enroll if a.pod.enrolled else MarkLocal)  # type: ignore[union-attr]


@given(desired_sets())
def test_plan_is_empty_when_the_kernel_matches(desired: list[DesiredPod]) -> None:
    actual = [
        PodDataplaneState(
            d.ip,
            d.ifindex or 0,
            d.host_ifname,
            d.enrolled,
            IN,
            EG if d.enrolled else None,
            PodCounters(),
        )
        for d in desired
    ]
    assert plan(desired, actual, programs=PROGRAMS) == []
