"""AgentConfig: flags beat VEIL_* variables beat defaults; bad values name flag and variable."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from agent.daemon.config import (
    DEFAULT_STATUS_SOCKET,
    AgentConfig,
    config_fields,
    config_from_args,
    parse_bool,
    parse_duration,
)
from agent.daemon.errors import AgentConfigError


def test_defaults_are_the_production_paths() -> None:
    c = config_from_args({}, {})
    assert c.node is None
    assert c.pin_dir == Path("/sys/fs/bpf/veil")
    assert c.status_socket == DEFAULT_STATUS_SOCKET == Path("/run/veil/agent.sock")
    assert c.state_dir == Path("/var/lib/veil/node")
    assert c.uplink is None and c.probe_source is None and c.drop_udp is False
    assert c.allow_icmp_echo is False  # fail closed: ping is a data channel


def test_environment_then_flags() -> None:
    env = {
        "VEIL_NODE_NAME": "node-a",
        "VEIL_PIN_DIR": "/sys/fs/bpf/veil/node-a",
        "VEIL_UPLINK": "eth1",
        "VEIL_PROBE_SOURCE": "10.0.0.5",
        "VEIL_DROP_UDP": "yes",
        "VEIL_ALLOW_ICMP_ECHO": "1",
        "VEIL_RESYNC_INTERVAL": "1m",
        "VEIL_AGENT_SOCKET": "/run/veil/a.sock",
    }
    c = config_from_args({}, env)
    assert c.node == "node-a"
    assert c.pin_dir == Path("/sys/fs/bpf/veil/node-a")
    assert c.uplink == "eth1"
    assert c.probe_source == IPv4Address("10.0.0.5")
    assert c.drop_udp is True
    assert c.allow_icmp_echo is True
    assert c.resync_interval == 60.0
    assert c.status_socket == Path("/run/veil/a.sock")
    c = config_from_args({"node": "node-b", "uplink": "eth0", "veth_retry": "50ms"}, env)
    assert (c.node, c.uplink, c.veth_retry) == ("node-b", "eth0", 0.05)


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ({"node": "Node_A"}, {}, "--node / VEIL_NODE_NAME"),
        ({}, {"VEIL_PIN_DIR": "/sys/fs/bpf/veil.d"}, "--pin-dir / VEIL_PIN_DIR"),
        ({"pin_dir": "relative"}, {}, "pin_dir"),
        ({"uplink": "a-very-long-interface"}, {}, "--uplink / VEIL_UPLINK"),
        ({"probe_source": "10.0.0"}, {}, "--probe-source"),
        ({}, {"VEIL_PROBE_SOURCE": "fd00::1"}, "VEIL_PROBE_SOURCE"),
        ({"probe_source": "0.0.0.0"}, {}, "cannot be a probe source"),
        ({}, {"VEIL_DROP_UDP": "maybe"}, "VEIL_DROP_UDP"),
        ({"resync_interval": "soon"}, {}, "--resync-interval"),
        ({"resync_interval": "0"}, {}, "out of range"),
        ({"status_socket": "/run/" + "x" * 120}, {}, "107 bytes"),
        ({"status_socket": "agent.sock"}, {}, "not absolute"),
        ({"state_dir": "state"}, {}, "not absolute"),
    ],
)
def test_rejections_name_the_source(args: dict[str, str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(AgentConfigError) as err:
        config_from_args(args, env)
    assert needle in str(err.value)
    assert err.value.hint


def test_config_is_frozen() -> None:
    c = AgentConfig()
    with pytest.raises(AttributeError):
        c.node = "x"  # type: ignore[misc]


def test_every_field_has_a_flag_and_variable() -> None:
    fields = config_fields()
    assert set(fields) == set(AgentConfig.__dataclass_fields__)
    assert all(env.startswith("VEIL_") and flag.startswith("--") for flag, env in fields.values())


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("200ms", 0.2), ("5m", 300.0), ("1h", 3600.0), ("2", 2.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "value"), [("1", True), ("TRUE", True), ("no", False), ("", False)]
)
def test_booleans(text: str, value: bool) -> None:
    assert parse_bool(text) is value
