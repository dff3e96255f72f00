"""The health socket's answers and the ``--health-socket`` setting, without sockets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.state.store import StateStore
from ztunnel.admin.health_socket import HealthAnswer, HealthSocket
from ztunnel.admin.readiness import Readiness
from ztunnel.config import ZtunnelConfig, config_from_args
from ztunnel.errors import ConfigError


def _health(extra: str | None = None) -> HealthSocket:
    readiness = Readiness(StateStore("node-a", "cluster.local"), None)
    if extra is not None:
        readiness.add_check("listeners", lambda: extra)
    return HealthSocket(Path("/nonexistent/health.sock"), readiness)


def test_live_depends_on_nothing() -> None:
    # No snapshot, a failing check: liveness is still fine.
    answer = _health("listeners not bound yet").answer(b"live\n")
    assert answer["ok"] is True and answer["check"] == "live"
    assert answer["pid"] == os.getpid()


def test_ready_reports_this_instances_reasons() -> None:
    h = _health("listeners not bound yet")
    answer = h.answer(b"ready\n")
    assert answer["ok"] is False
    assert answer["instance"] == h.instance
    reasons = answer["reasons"]
    assert isinstance(reasons, list)
    assert "waiting for the first snapshot from the controller" in reasons
    assert "listeners: listeners not bound yet" in reasons


def test_instances_are_distinguishable() -> None:
    assert _health().instance != _health().instance


@pytest.mark.parametrize("request_line", [b"", b"\xff\xfe", b"READY", b"x" * 500])
def test_unknown_requests_are_refused_not_crashing(request_line: bytes) -> None:
    answer = _health().answer(request_line)
    assert answer["ok"] is False
    assert "unknown check" in str(answer["reasons"])
    assert len(str(answer["check"])) <= 64


def test_describe_names_the_instance() -> None:
    a = HealthAnswer("ready", False, ("listeners: draining for shutdown",), 7, "abc")
    assert a.describe() == "not ready (pid 7, instance abc): listeners: draining for shutdown"
    assert HealthAnswer("live", True, (), 7, "abc").describe() == "alive (pid 7, instance abc)"


def test_setting_from_env_and_flag() -> None:
    env = {"VEIL_ZTUNNEL_HEALTH_SOCKET": "/var/run/veil-ztunnel/health.sock"}
    cfg = config_from_args({"node_name": "node-a"}, env)
    assert cfg.health_socket == Path("/var/run/veil-ztunnel/health.sock")
    assert config_from_args({"node_name": "node-a"}, {}).health_socket is None


def test_overlong_path_is_refused_naming_the_flag() -> None:
    with pytest.raises(ConfigError) as e:
        ZtunnelConfig(node_name="node-a", health_socket=Path("/" + "d" * 90 + "/h.sock"))
    assert "--health-socket" in e.value.message and "VEIL_ZTUNNEL_HEALTH_SOCKET" in e.value.message
