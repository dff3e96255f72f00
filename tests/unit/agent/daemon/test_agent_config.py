"""AgentConfig: flags beat VEIL_* variables beat defaults; bad values name flag and variable."""

from __future__ import annotations

import argparse
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from agent.daemon.config import (
    DEFAULT_STATUS_SOCKET,
    AgentConfig,
    add_config_arguments,
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
        ({"probe_sources": "10.0.0"}, {}, "--probe-source"),
        ({}, {"VEIL_PROBE_SOURCE": "fd00::1,nope"}, "VEIL_PROBE_SOURCE"),
        ({"probe_sources": "0.0.0.0"}, {}, "cannot be a probe source"),
        ({"probe_sources": "::"}, {}, "cannot be a probe source"),
        ({"probe_sources": "fd00::1,fd00::2"}, {}, "several IPv6 probe sources"),
        ({"probe_sources": "10.0.0.1,10.0.0.2"}, {}, "several IPv4 probe sources"),
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


def test_probe_source_takes_ipv4_and_ipv6_as_a_list_or_repeated() -> None:
    c = config_from_args({}, {"VEIL_PROBE_SOURCE": " fd00::5 , 10.0.0.5 "})
    assert c.probe_source == IPv4Address("10.0.0.5")
    assert c.probe_source6 == IPv6Address("fd00::5")
    only6 = config_from_args({"probe_sources": "fd00::5"}, {})
    assert only6.probe_source is None and only6.probe_source6 == IPv6Address("fd00::5")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--probe-source", "10.0.0.5", "--probe-source", "fd00::5"])
    c = config_from_args(args, {"VEIL_PROBE_SOURCE": "10.9.9.9"})  # the flag wins
    assert c.probe_sources == (IPv4Address("10.0.0.5"), IPv6Address("fd00::5"))
    # An IPv4-mapped IPv6 address is the IPv4 address.
    assert config_from_args({"probe_sources": "::ffff:10.0.0.5"}, {}).probe_source == (
        IPv4Address("10.0.0.5")
    )
    opts = config_from_args({"probe_sources": "10.0.0.5,fd00::5", "drop_udp": "1"}, {})
    assert opts.dataplane_options().probe_source6 == IPv6Address("fd00::5")
    assert opts.dataplane_options().drop_udp is True
