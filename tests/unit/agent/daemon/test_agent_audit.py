"""The node audit (veilctl verify) and the /pods rows, from hand-built kernel state."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from agent.bpf import AttachedProgram, LoadedProgram, NodeDataplaneState, PodCounters
from agent.bpf import PodDataplaneState as Pod
from agent.bpf.codes import DropReason
from agent.daemon.audit import (
    AuditInput,
    Listener,
    audit,
    check_listeners,
    parse_proc_net_tcp,
)
from agent.daemon.reconcile import DesiredPod
from agent.daemon.views import pod_rows
from agent.net.routing import PolicyRouting
from agent.net.tc import Hook

A = IPv4Address("10.244.1.10")
A6 = IPv6Address("fd00:10:244:1::a")
B = IPv4Address("10.244.1.11")
IN = AttachedProgram("veil_pod_ingress", Hook.INGRESS, 11)
EG = AttachedProgram("veil_pod_egress", Hook.EGRESS, 12)
UP = AttachedProgram("veil_uplink_ingress", Hook.INGRESS, 13)
NODE = NodeDataplaneState(
    pin_dir=Path("/sys/fs/bpf/veil"),
    loaded_build_id="ab" * 32,
    source_build_id="ab" * 32,
    reused_pins=True,
    programs=tuple(
        LoadedProgram(n, Path(f"/sys/fs/bpf/veil/prog_{n}"), i, "t")
        for n, i in (("pod_ingress", 11), ("uplink_ingress", 13), ("pod_egress", 12))
    ),
    uplink_ifindex=2,
    uplink_ifname="eth0",
    uplink_program=UP,
    policy_routing=PolicyRouting(rule=True, route=True, rule6=True, route6=True),
    probe_source=None,
)
DESIRED = (
    DesiredPod("shop/a", A, True, 5, "vh5", ipv6=(A6,)),
    DesiredPod("legacy/b", B, False, 6, "vh6"),
)
PODS = (
    Pod(A, 5, "vh5", True, IN, EG, PodCounters(3, 1, 9, {DropReason.SPOOFED_SOURCE: 2}), (A6,)),
    Pod(B, 6, "vh6", False, IN, None, PodCounters()),
)
LISTENING = (
    Listener(15001, "0.0.0.0", 0x200),
    Listener(15006, "0.0.0.0", 0x200),
    Listener(15008, "0.0.0.0", 0x1200),  # other bits outside the mask are fine
    Listener(22, "0.0.0.0", 0),
)
HEALTHY = AuditInput(
    synced=True,
    desired=DESIRED,
    pods=PODS,
    local_ips={A: 5, A6: 5},
    node=NODE,
    cflags=("-DVEIL_OUTBOUND_PORT=15001",),
    listening=LISTENING,
)


def test_healthy_node_has_no_findings() -> None:
    report = audit(HEALTHY)
    assert report.ok
    assert [c.name for c in report.checks] == [
        "registry",
        "build",
        "policy-routing",
        "uplink",
        "listeners",
        "pods",
    ]
    assert report.to_dict()["ok"] is True


@pytest.mark.parametrize(
    ("change", "check", "needle"),
    [
        (
            {"pods": (replace(PODS[0], egress=None), PODS[1])},
            "pods",
            "egress guard program missing",
        ),
        ({"pods": (replace(PODS[0], ingress=None), PODS[1])}, "pods", "can bypass"),
        (
            {"pods": (replace(PODS[0], egress=replace(EG, prog_id=99)), PODS[1])},
            "pods",
            "not the pinned 12",
        ),
        ({"pods": (PODS[1],)}, "pods", "not enrolled in the data plane"),
        ({"pods": (replace(PODS[0], enrolled=False), PODS[1])}, "pods", "data plane does not"),
        ({"local_ips": {}}, "pods", "local address entry"),
        ({"pods": (replace(PODS[0], pod_ip=B), PODS[1])}, "pods", "anti-spoof entry"),
        ({"pods": (PODS[0], replace(PODS[1], ingress=None))}, "pods", "dropped instead of steered"),
        (
            {
                "pods": (
                    *PODS,
                    Pod(IPv4Address("10.244.1.99"), 7, "vh7", True, IN, EG, PodCounters()),
                )
            },
            "pods",
            "no local workload has",
        ),
        (
            {
                "desired": (
                    replace(DESIRED[0], ifindex=None, host_ifname=None, veth_error="no route"),
                    DESIRED[1],
                )
            },
            "pods",
            "no host veth",
        ),
        ({"listening": LISTENING[1:]}, "listeners", "nothing listens on :15001"),
        (
            {"listening": (Listener(15001, "0.0.0.0", 0), *LISTENING[1:])},
            "listeners",
            "lacks the ztunnel mark 0x200 (it has 0x0)",
        ),
        (
            {"listening": (Listener(15001, "127.0.0.1", 0x200), *LISTENING[1:])},
            "listeners",
            "listens on 127.0.0.1 only",
        ),
        ({"synced": False}, "registry", "has not received the registry"),
        ({"node": replace(NODE, uplink_program=None)}, "uplink", "not attached"),
        (
            {"node": replace(NODE, uplink_program=replace(UP, prog_id=5))},
            "uplink",
            "not the pinned",
        ),
        ({"node": replace(NODE, uplink_ifname=None)}, "uplink", "no longer exists"),
        (
            {"node": replace(NODE, policy_routing=PolicyRouting(False, True))},
            "policy-routing",
            "fwmark rule",
        ),
        (
            {"node": replace(NODE, policy_routing=PolicyRouting(True, False))},
            "policy-routing",
            "local route",
        ),
        (
            {"node": replace(NODE, policy_routing=PolicyRouting(True, True, False, True))},
            "policy-routing",
            "IPv6 fwmark rule",
        ),
        (
            {"node": replace(NODE, policy_routing=PolicyRouting(True, True, True, False))},
            "policy-routing",
            "IPv6 local route",
        ),
        (
            {"pods": (replace(PODS[0], ipv6=()), PODS[1])},
            "pods",
            f"no anti-spoof entry for its IPv6 address {A6}",
        ),
        (
            {"pods": (replace(PODS[0], ipv6=(A6, IPv6Address("fd00::66"))), PODS[1])},
            "pods",
            "allows IPv6 fd00::66",
        ),
        ({"local_ips": {A: 5}}, "pods", f"local address entry for {A6} missing"),
        ({"node": replace(NODE, source_build_id="cd" * 32)}, "build", "the agent built"),
        ({"cflags": ("-DVEIL_FAIL_OPEN=1",)}, "build", "lets traffic bypass"),
    ],
)
def test_each_problem_is_a_finding_with_a_fix(
    change: dict[str, object], check: str, needle: str
) -> None:
    report = audit(replace(HEALTHY, **change))  # type: ignore[arg-type]
    assert not report.ok
    hits = [f for f in report.findings if f.check == check and needle in f.problem]
    assert hits, report.findings
    assert all(f.fix for f in report.findings)


def test_listener_check_is_skipped_when_not_read() -> None:
    report = audit(replace(HEALTHY, listening=None))
    assert "listeners" not in [c.name for c in report.checks]


def test_check_listeners_detail() -> None:
    result = check_listeners([Listener(15001, "::", None)])
    assert result.detail == "listening: 15001 (marks not readable)"
    assert [f.subject for f in result.findings] == [":15006", ":15008"]


def test_parse_proc_net_tcp() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n"
        "   1: 0100007F:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n"
        "   2: 0A000001:3A99 0A000002:C350 01 00000000:00000000 00:00000000 00000000     0\n"
        "   3: 00000000000000000000000000000000:3AA0 00000000000000000000000000000000:0000 0A\n"
        "   4: 00000000000000000000000001000000:3AA1 00000000000000000000000000000000:0000 0A\n"
    )
    assert parse_proc_net_tcp(text) == [
        Listener(15001, "0.0.0.0"),
        Listener(15000, "127.0.0.1"),
        Listener(15008, "::"),
        Listener(15009, "::1"),
    ]


def test_pod_rows_join_registry_and_kernel() -> None:
    orphan = Pod(IPv4Address("10.244.1.99"), 7, None, True, None, None, PodCounters())
    pending = DesiredPod("shop/c", IPv4Address("10.244.1.12"), True, None, None, "no route")
    rows = pod_rows(
        (*DESIRED, pending),
        (PODS[0], replace(PODS[1], egress=EG), orphan),
        {"pod_ingress": 11, "pod_egress": 12},
    )
    by = {r["ip"]: r for r in rows}
    a = by[str(A)]
    assert a["workload"] == "shop/a" and a["state"] == "ok" and a["protected"] is True
    assert a["redirected"] == {"outbound": 3, "inbound": 1}
    assert a["dropped"] == 2 and a["drops"] == {"spoofed_source": 2}
    assert a["programs"] == {"ingress": 11, "egress": 12}
    assert by[str(B)]["state"].startswith("drift: egress guard attached")
    assert by[str(B)]["dataplane"] == "tracked"
    assert by["10.244.1.12"]["state"] == "pending: no route"
    assert by["10.244.1.12"]["dataplane"] == "absent"
    assert by["10.244.1.99"]["workload"] is None and by["10.244.1.99"]["state"].startswith("orphan")


def test_policy_routing_without_ipv6_in_the_namespace_needs_no_ipv6_half() -> None:
    no_v6 = PolicyRouting(True, True, False, False, ipv6_enabled=False)
    assert no_v6.complete
    report = audit(replace(HEALTHY, node=replace(NODE, policy_routing=no_v6)))
    assert not [f for f in report.findings if f.check == "policy-routing"]
