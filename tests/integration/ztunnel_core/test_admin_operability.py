"""veilctl against a real ztunnel admin API on loopback: runtime log levels,
the deny stream (monitor), services, config, the policy what-if and versions.

The admin server runs in this process (so a log level change is visible on
the logger itself); veilctl runs in a worker thread, talking HTTP to it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.cli import veilctl
from controller.api.model import (
    AuthorizationPolicy,
    Labels,
    Namespace,
    Operation,
    PolicyAction,
    Rule,
    Service,
    ServicePort,
    Source,
    WatchUpdate,
    Workload,
)
from node.state import StateStore
from ztunnel.admin import OpsServer, Readiness
from ztunnel.admin.denies import DenyFeed
from ztunnel.metrics import ConnectionReport, Registry, Reporter, TrafficMetrics

NODE = "node-a"
WEB = Workload("web", "shop", "web", NODE, ("10.0.0.1",), enrolled=True)
PAY = Workload("pay", "prod", "pay", NODE, ("10.0.0.2",), Labels({"app": "pay"}), enrolled=True)


@pytest.fixture
async def admin() -> AsyncIterator[tuple[str, TrafficMetrics, DenyFeed]]:
    store = StateStore(NODE)
    store.apply(
        WatchUpdate(
            "e1",
            1,
            True,
            (
                Namespace("shop"),
                Namespace("prod"),
                WEB,
                PAY,
                Service(
                    "pay",
                    "prod",
                    ("10.96.0.2",),
                    (ServicePort(80, 8080),),
                    Labels({"app": "pay"}),
                    ("prod/pay",),
                ),
                AuthorizationPolicy(
                    "allow-web",
                    "prod",
                    PolicyAction.ALLOW,
                    (
                        Rule(
                            (Source(principals=("cluster.local/ns/shop/sa/web",)),),
                            (Operation(ports=(8080,)),),
                        ),
                    ),
                ),
            ),
        )
    )
    registry = Registry()
    traffic = TrafficMetrics(registry)
    denies = DenyFeed()
    traffic.deny_listeners.append(denies.publish)
    ops = OpsServer(
        store=store,
        registry=registry,
        readiness=Readiness(store, None),
        denies=denies,
        admin_address=("127.0.0.1", 0),
        metrics_address=None,
        readiness_address=None,
    )
    await ops.start()
    host, port = ops.addresses["admin"]
    try:
        yield f"{host}:{port}", traffic, denies
    finally:
        await ops.stop()


async def ctl(addr: str, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(
        veilctl.main,
        ["--agent-socket", "/nonexistent/agent.sock", "--ztunnel-admin", addr, *args],
        out,
    )
    return code, out.getvalue()


def deny_report() -> ConnectionReport:
    return ConnectionReport(
        reporter=Reporter.DESTINATION,
        src_addr=("10.0.0.9", 5555),
        dst_addr=("10.0.0.2", 8080),
        dst_workload=PAY,
        dst_principal=PAY.identity,
        verdict="deny",
        reason="no ALLOW policy matched",
        policy=None,
        response_flags="DENY",
        direction="inbound",
    )


async def test_log_level_changes_at_runtime(admin: tuple[str, TrafficMetrics, DenyFeed]) -> None:
    addr, _, _ = admin
    logger = logging.getLogger("veil.ztunnel.proxy")
    before = logger.level
    try:
        code, text = await ctl(addr, "log", "--component", "ztunnel", "--level", "proxy=debug")
        assert code == 0 and "veil.ztunnel.proxy=debug" in text
        assert logger.level == logging.DEBUG
        code, text = await ctl(
            addr, "log", "--component", "ztunnel", "--level", "proxy=loud", "-o", "json"
        )
        assert code == 1 and "unknown log level" in json.loads(text)["error"]["message"]
    finally:
        logger.setLevel(before)


async def test_monitor_streams_denies(admin: tuple[str, TrafficMetrics, DenyFeed]) -> None:
    addr, traffic, denies = admin
    watcher = asyncio.create_task(
        ctl(
            addr,
            "monitor",
            "--type",
            "deny",
            "--count",
            "1",
            "-n",
            "prod",
            "-o",
            "json",
            "--idle-timeout",
            "20",
        )
    )
    for _ in range(100):  # until veilctl is following (bounded: 10 s)
        if denies._followers:
            break
        await asyncio.sleep(0.1)
    traffic.connection_closed(deny_report())
    code, text = await asyncio.wait_for(watcher, 30)
    assert code == 0
    event = json.loads(text.splitlines()[0])
    assert event["type"] == "deny" and event["dst_workload"] == "prod/pay"
    assert event["reason"] == "no ALLOW policy matched" and event["time"].endswith("Z")
    # The history keeps it too (GET /denies).
    assert [e["dst_workload"] for e in denies.recent()] == ["prod/pay"]
    # A quiet stream ends at --idle-timeout, with exit 0.
    code, text = await ctl(addr, "monitor", "--type", "deny", "--idle-timeout", "1")
    assert code == 0 and text == ""


async def test_services_config_whatif_and_version(
    admin: tuple[str, TrafficMetrics, DenyFeed], tmp_path: Path
) -> None:
    addr, _, _ = admin
    code, text = await ctl(addr, "services")
    assert code == 0 and "prod/pay" in text and "10.96.0.2" in text and "80->8080" in text
    code, text = await ctl(addr, "services", "-n", "shop")
    assert code == 0 and "(no services)" in text
    code, text = await ctl(addr, "config", "-o", "json")
    doc = json.loads(text)
    assert code == 3 and doc["ztunnel"]["node"] == NODE and "agent" in doc["errors"]
    code, text = await ctl(addr, "policy", "check", "--from", "shop/web", "--to", "prod/pay:8080")
    assert code == 0 and text.startswith("ALLOW") and "prod/allow-web" in text
    code, text = await ctl(
        addr, "policy", "check", "--from", "shop/web", "--to", "pay:9090", "-o", "yaml"
    )
    assert code == 1 and "allowed: false" in text
    code, text = await ctl(addr, "workloads", "--all", "--workload", "web", "-o", "yaml")
    assert code == 0 and "shop/web" in text and "prod/pay" not in text
    code, text = await ctl(addr, "--version")
    assert code == 0 and "ztunnel: " in text and "ztunnel: unreachable" not in text
