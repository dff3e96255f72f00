"""Snapshot indexes for dual-stack workloads and services, and normalize_ip (issue 9 §2)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api.model import Labels, Service, ServicePort, Workload
from node.state import Snapshot, build_snapshot, normalize_ip

PAY = Workload("payments", "shop", "payments", "node-b",
               ("10.244.2.10", "fd00:244:2::a", "FD00:244:2::10"), Labels({"app": "payments"}),
               enrolled=True)  # fmt: skip
CHECKOUT = Workload("checkout", "shop", "checkout", "node-a",
                    ("fd00:244:1:0:0:0:0:a", "10.244.1.10"), enrolled=True)  # fmt: skip
SVC = Service("payments", "shop", ("10.96.0.20", "FD00:96::20"), (ServicePort(80, 8081),),
              endpoints=("shop/payments",))  # fmt: skip


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return build_snapshot("node-b", [PAY, CHECKOUT, SVC], epoch="e", version=1, trust_bundle=None)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("fd00:244:2::a", "fd00:244:2::a"),
        ("FD00:244:2:0:0:0:0:A", "fd00:244:2::a"),
        ("fd00:0244:0002::000a", "fd00:244:2::a"),
        ("::ffff:10.244.2.10", "10.244.2.10"),
        ("::FFFF:af4:20a", "10.244.2.10"),  # mapped, in hex form
        ("fe80::1%eth0", "fe80::1"),
        ("10.244.2.10", "10.244.2.10"),
        ("::", "::"),
        ("not-an-ip", "not-an-ip"),
        ("", ""),
    ],
)
def test_normalize_ip(raw: str, canonical: str) -> None:
    assert normalize_ip(raw) == canonical


@given(st.ip_addresses())
def test_normalize_ip_is_idempotent_and_keeps_the_address(addr: ipaddress._BaseAddress) -> None:
    once = normalize_ip(str(addr))
    assert normalize_ip(once) == once
    parsed = ipaddress.ip_address(once)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        assert parsed == addr.ipv4_mapped
    else:
        assert parsed == addr


@pytest.mark.parametrize(
    "ip",
    ["10.244.2.10", "fd00:244:2::a", "FD00:244:2:0::A", "fd00:244:2::10", "::ffff:10.244.2.10"],
)
def test_every_address_of_a_workload_is_indexed(snap: Snapshot, ip: str) -> None:
    assert snap.workload_by_ip(ip) is PAY
    assert snap.local_workload_by_ip(ip) is PAY


def test_index_keys_are_canonical(snap: Snapshot) -> None:
    assert {"fd00:244:2::a", "fd00:244:2::10", "fd00:244:1::a"} <= set(snap.by_ip)
    assert all(k == normalize_ip(k) for k in snap.by_ip)


def test_remote_v6_workload_is_not_local(snap: Snapshot) -> None:
    assert snap.workload_by_ip("fd00:244:1::a") is CHECKOUT
    assert snap.local_workload_by_ip("fd00:244:1::a") is None


def test_v6_service_vip(snap: Snapshot) -> None:
    for vip in ("fd00:96::20", "FD00:96:0::20", "10.96.0.20"):
        found = snap.service_at(vip, 80)
        assert found is not None and found[0] is SVC and found[1].target_port == 8081
        assert snap.is_vip(vip)
    assert snap.service_at("fd00:96::20", 81) is None
    assert not snap.is_vip("fd00:96::21")


def test_two_workloads_claiming_one_v6_address_resolve_deterministically() -> None:
    a = Workload("a", "shop", "a", "node-b", ("fd00::1",), enrolled=True, ready=False)
    b = Workload("b", "shop", "b", "node-b", ("FD00:0::1",), enrolled=True)
    for order in ([a, b], [b, a]):
        snap = build_snapshot("node-b", order, epoch="e", version=1, trust_bundle=None)
        assert snap.workload_by_ip("fd00::1") is b  # the ready one
