"""Workloads with IPv6 addresses only: desired pods and plan() keyed by their IPv6 address."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from agent.bpf import AttachedProgram, PodCounters, PodDataplaneState
from agent.daemon.reconcile import (
    DesiredPod,
    Enroll,
    MarkLocal,
    Unenroll,
    VethLookup,
    describe,
    desired_pods,
    plan,
)
from agent.daemon.views import pod_rows
from agent.net.tc import Hook
from controller.api.model import Workload

IN = AttachedProgram("veil_pod_ingress", Hook.INGRESS, 11)
EG = AttachedProgram("veil_pod_egress", Hook.EGRESS, 12)
V4 = IPv4Address("10.244.1.10")
V6 = IPv6Address("fd00::10")
V6B = IPv6Address("fd00::20")


def wl(name: str, ips: tuple[str, ...], enrolled: bool = True) -> Workload:
    return Workload(name, "shop", "sa", "node-a", ips, enrolled=enrolled)


def v6_pod(*addrs: IPv6Address, ifindex: int = 5, enrolled: bool = True) -> DesiredPod:
    return DesiredPod("shop/a", addrs[0], enrolled, ifindex, f"vh{ifindex}", ipv6=addrs)


def have(
    ip: IPv4Address | IPv6Address,
    ipv6: tuple[IPv6Address, ...],
    ifindex: int = 5,
    enrolled: bool = True,
) -> PodDataplaneState:
    return PodDataplaneState(
        ip, ifindex, f"vh{ifindex}", enrolled, IN, EG if enrolled else None, PodCounters(), ipv6
    )


def test_ipv6_only_workload_is_one_pod_found_by_its_ipv6_route() -> None:
    asked: list[IPv4Address | IPv6Address] = []

    def lookup(ip: IPv4Address | IPv6Address) -> VethLookup:
        asked.append(ip)
        return VethLookup.found(7, "vh7")

    state = desired_pods([wl("a", ("fd00::20", "fd00::10", "fe80::5"))], "node-a", lookup)
    assert state.pods == (DesiredPod("shop/a", V6, True, 7, "vh7", ipv6=(V6, V6B)),)
    assert asked == [V6]
    assert any("fe80::5" in line for line in state.ignored)


def test_ipv6_only_address_claimed_by_the_snapshot_owner_is_left_to_it() -> None:
    old, new = wl("old", ("fd00::10",)), wl("new", ("fd00::10",))
    state = desired_pods(
        [old, new], "node-a", lambda ip: VethLookup.found(5, "vh5"), owner_of=lambda ip: new
    )
    assert [p.key for p in state.pods] == ["shop/new"]
    assert "shop/new, which wins" in state.ignored[0]


def test_plan_enrolls_a_new_ipv6_only_pod_and_then_holds_still() -> None:
    d = v6_pod(V6)
    (action,) = plan([d], [])
    assert isinstance(action, Enroll) and action.pod.ip == V6
    assert describe(action).startswith("enroll shop/a fd00::10 on vh5")
    assert plan([d], [have(V6, (V6,))]) == []


def test_plan_tracks_a_not_enrolled_ipv6_only_pod() -> None:
    (action,) = plan([v6_pod(V6, enrolled=False)], [])
    assert isinstance(action, MarkLocal)


def test_plan_reenrolls_when_an_ipv6_only_address_changes() -> None:
    # Same veth, new address: one Enroll replaces the entry, never an Unenroll first.
    (action,) = plan([v6_pod(V6B)], [have(V6, (V6,))])
    assert isinstance(action, Enroll) and action.pod.ipv6 == (V6B,)
    # A second address added: the pod keeps its key, only its IPv6 set differs.
    (action,) = plan([v6_pod(V6, V6B)], [have(V6, (V6,))])
    assert isinstance(action, Enroll) and "IPv6 addresses differ" in action.reason


def test_plan_moves_a_pod_from_ipv4_to_ipv6_only_in_one_step() -> None:
    (action,) = plan([v6_pod(V6)], [have(V4, (V6,))])
    assert isinstance(action, Enroll) and action.pod.ip == V6


def test_plan_unenrolls_a_gone_ipv6_only_pod_by_its_address() -> None:
    assert plan([], [have(V6, (V6,))]) == [Unenroll(V6, 5, "no local workload has this address")]


def test_plan_and_rows_mix_both_families() -> None:
    v4 = DesiredPod("shop/b", V4, True, 6, "vh6", ipv6=(V6B,))
    d = v6_pod(V6)
    actual = [have(V6, (V6,)), have(V4, (V6B,), ifindex=6), have(IPv6Address("fd00::99"), (), 9)]
    assert plan([v4, d], actual) == [
        Unenroll(IPv6Address("fd00::99"), 9, "no local workload has this address")
    ]
    rows = pod_rows([d, v4], actual)
    assert [(r["workload"], r["ip"], r["ipv6"], r["state"]) for r in rows[:2]] == [
        ("shop/a", "fd00::10", ["fd00::10"], "ok"),
        ("shop/b", "10.244.1.10", ["fd00::20"], "ok"),
    ]
