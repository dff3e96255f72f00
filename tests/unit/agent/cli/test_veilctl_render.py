"""veilctl's tables from canned agent and ztunnel documents (no sockets)."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.cli import veilctl
from agent.cli.output import render
from controller.api.model import (
    AuthorizationPolicy,
    Namespace,
    Operation,
    PolicyAction,
    Rule,
    Source,
    Workload,
)
from node.state import build_snapshot
from ztunnel.admin.dump import config_dump

AGENT_STATUS: dict[str, Any] = {
    "node": "node-a",
    "version": "0.1.0",
    "pid": 4242,
    "uptime_s": 3725.2,
    "cpu_percent": 1.5,
    "rss_bytes": 60 * 1048576,
    "dataplane": {
        "loaded_build_id": "ab" * 32,
        "in_sync": True,
        "programs": [
            {"name": "pod_ingress", "prog_id": 11},
            {"name": "uplink_ingress", "prog_id": 13},
            {"name": "pod_egress", "prog_id": 12},
        ],
        "uplink": {"ifname": "eth0", "program": {"prog_id": 13}},
        "policy_routing": {"rule": True, "route": False},
    },
    "pods": {"entries": 3, "enrolled": 2, "protected": 2},
    "registry": {"synced": True, "version": 7, "local_workloads": 3},
    "watch": {"connected": False, "last_error": "UNAVAILABLE: controller down"},
    "last_reconcile": {
        "at": 1000.0,
        "duration_ms": 4.2,
        "actions": ["enroll shop/a"],
        "errors": [],
        "pending": [],
    },
    "errors": [],
}

PODS: list[dict[str, Any]] = [
    {
        "workload": "shop/a",
        "ip": "10.244.1.10",
        "veth": "vh5",
        "enrolled": True,
        "dataplane": "enrolled",
        "programs": {"ingress": 11, "egress": 12},
        "redirected": {"outbound": 3, "inbound": 1},
        "dropped": 2,
        "drops": {"spoofed_source": 2},
        "state": "ok",
    },
    {
        "workload": None,
        "ip": "10.244.1.99",
        "veth": None,
        "enrolled": False,
        "dataplane": "tracked",
        "programs": {"ingress": None, "egress": None},
        "redirected": {"outbound": 0, "inbound": 0},
        "dropped": 0,
        "drops": {},
        "state": "orphan: no local workload has this address",
    },
]


def ztunnel_dump() -> dict[str, Any]:
    snap = build_snapshot(
        "node-a",
        [
            Namespace("shop"),
            Workload("a", "shop", "sa-a", "node-a", ("10.244.1.10",), enrolled=True),
            Workload("b", "shop", "sa-b", "node-b", ("10.244.2.10",), enrolled=True),
            AuthorizationPolicy(
                "allow-a",
                "shop",
                PolicyAction.ALLOW,
                (
                    Rule(
                        (Source(principals=("cluster.local/ns/shop/sa/sa-a",)),),
                        (Operation(ports=(8080,)),),
                    ),
                ),
            ),
        ],
        epoch="e1",
        version=4,
        trust_bundle=None,
    )
    certs = [
        {
            "identity": "spiffe://cluster.local/ns/shop/sa/sa-a",
            "state": "valid",
            "serial": "0a1b",
            "not_after": "2030-01-02T00:00:00+00:00",
            "rotation_due": "2029-01-01T00:00:00+00:00",
            "last_error": None,
        },
        {
            "identity": "spiffe://cluster.local/ns/shop/sa/old",
            "state": "valid",
            "serial": "0c",
            "not_after": "2020-01-02T00:00:00+00:00",
            "rotation_due": "2020-01-01T12:00:00+00:00",
            "last_error": None,
        },
    ]
    conns = [
        {
            "id": 1,
            "direction": "outbound",
            "src": "10.244.1.10:40000",
            "dst": "10.244.2.10:8080",
            "src_workload": "shop/a",
            "dst_workload": "shop/b",
            "src_identity": "spiffe://cluster.local/ns/shop/sa/sa-a",
            "dst_identity": "spiffe://cluster.local/ns/shop/sa/sa-b",
            "bytes_received": 10,
            "bytes_sent": 20,
            "duration_s": 65.0,
            "verdict": "allow",
        },
    ]
    return config_dump(snap, certificates=certs, connections=conns)


def test_status_lines_flag_what_is_wrong() -> None:
    lines = veilctl.status_lines(AGENT_STATUS, ztunnel_dump(), {}, now=1030.0)
    assert lines["agent"] == "running, pid 4242, version 0.1.0, up 1h2m5s"
    assert lines["programs"] == "pod_ingress=11 uplink_ingress=13 pod_egress=12"
    assert lines["uplink"] == "eth0 (program 13)"
    assert lines["policy routing"].startswith("INCOMPLETE (rule=yes, route=no)")
    assert lines["controller watch"] == "DOWN: UNAVAILABLE: controller down"
    assert lines["last reconcile"].startswith("30s ago, 4.2 ms, 1 actions")
    assert lines["ztunnel state"] == "synced, version 4, 1 local workloads"
    assert lines["ztunnel connections"] == 1


def test_status_lines_when_components_are_down() -> None:
    lines = veilctl.status_lines(None, None, {"agent": "no socket", "ztunnel": "refused"})
    assert lines == {"agent": "UNREACHABLE: no socket", "ztunnel": "UNREACHABLE: refused"}


def test_pod_table() -> None:
    out = io.StringIO()
    render(veilctl.pod_rows(PODS), veilctl.POD_COLUMNS, "table", out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "POD",
        "IP",
        "VETH",
        "ENROLLED",
        "DATAPLANE",
        "PROGRAMS",
        "REDIRECTED(OUT/IN)",
        "DROPPED",
        "STATE",
    ]
    assert lines[1].split()[:8] == [
        "shop/a",
        "10.244.1.10",
        "vh5",
        "yes",
        "enrolled",
        "in=11,eg=12",
        "3/1",
        "2",
    ]
    assert "(spoofed_source=2)" in lines[1]
    assert lines[2].split()[:6] == ["-", "10.244.1.99", "-", "no", "tracked", "in=-,eg=-"]


def test_workloads_local_and_all() -> None:
    dump = ztunnel_dump()
    local = veilctl.workload_rows(dump["workloads"], local_only=True)
    assert [w["workload"] for w in local] == ["shop/a"]
    assert local[0]["identity"] == "spiffe://cluster.local/ns/shop/sa/sa-a"
    assert len(veilctl.workload_rows(dump["workloads"], local_only=False)) == 2


def test_policy_rows() -> None:
    [row] = veilctl.policy_rows(ztunnel_dump()["policies"])
    assert row["policy"] == "shop/allow-a" and row["action"] == "ALLOW"
    assert row["selector"] == "(namespace)"
    assert row["rules"] == "from principals=cluster.local/ns/shop/sa/sa-a; to ports=8080"


def test_cert_rows_mark_rotation_due() -> None:
    rows = veilctl.cert_rows(ztunnel_dump()["certificates"], now=datetime(2025, 1, 1, tzinfo=UTC))
    assert rows[0]["rotation"] == "2029-01-01T00:00:00Z"  # RFC 3339 UTC
    assert rows[1]["rotation"].endswith("(due)")
    assert rows[0]["serial"] == "0a1b"


def test_connection_rows() -> None:
    [row] = veilctl.connection_rows(ztunnel_dump()["connections"])
    assert row["src"] == "10.244.1.10:40000 shop/a"
    assert row["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/sa-b"
    assert row["bytes"] == "10/20" and row["duration"] == "1m5s"


def test_verify_lines() -> None:
    report = {
        "checks": [{"name": "pods", "ok": False, "detail": "1 enrolled"}],
        "findings": [
            {
                "check": "pods",
                "subject": "shop/a (10.244.1.10)",
                "problem": "egress guard program missing on vh5",
                "fix": "restart",
            }
        ],
    }
    lines = veilctl.verify_lines(report)
    assert lines[0].startswith("FAIL  pods")
    assert "  [pods] shop/a (10.244.1.10): egress guard program missing on vh5" in lines
    assert "      fix: restart" in lines
    ok = veilctl.verify_lines({"checks": [{"name": "pods", "ok": True, "detail": "x"}]})
    assert ok[-1].startswith("no findings")


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as err:
        veilctl.main(["no-such-command"])
    assert err.value.code == veilctl.EXIT_USAGE
    with pytest.raises(SystemExit) as err:
        veilctl.main(["pods", "-o", "xml"])
    assert err.value.code == veilctl.EXIT_USAGE


def test_bad_admin_address_is_an_error() -> None:
    assert veilctl.main(["--ztunnel-admin", "nonsense", "status"]) == veilctl.EXIT_FINDINGS


def test_ztunnel_summary() -> None:
    summary = veilctl.ztunnel_summary(ztunnel_dump())
    assert summary is not None
    assert summary["local_workloads"] == 1
    assert summary["certificates"] == {"valid": 2, "pending": 0, "expired": 0}
    assert summary["connections"] == 1 and summary["state"]["version"] == 4
    assert veilctl.ztunnel_summary(None) is None
