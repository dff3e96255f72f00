"""ZtunnelConfig: precedence (flags > env > defaults) and validation messages."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from ztunnel.config import (
    ZtunnelConfig,
    add_config_arguments,
    config_fields,
    config_from_args,
    parse_duration,
    parse_host_port,
)
from ztunnel.errors import ConfigError


def parse(argv: list[str], env: dict[str, str] | None = None) -> ZtunnelConfig:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(argv), env or {})


def test_every_field_has_a_flag_and_env_var() -> None:
    assert set(config_fields()) == {f.name for f in fields(ZtunnelConfig)}
    for flag, env in config_fields().values():
        assert flag.startswith("--") and env.startswith("VEIL_")


def test_defaults() -> None:
    c = parse(["--node-name", "node-a"])
    assert c.node_name == "node-a"
    assert (c.outbound_port, c.inbound_plaintext_port, c.hbone_port) == (15001, 15006, 15008)
    assert c.admin_address == ("127.0.0.1", 15000)
    assert c.metrics_address == ("0.0.0.0", 15020)
    assert c.readiness_address == ("0.0.0.0", 15021)
    assert c.drain_grace_period == 25.0
    assert c.pool_idle_timeout == 300.0
    assert c.cert_ttl is None and c.key_dir is None and c.controller_address is None


def test_flags_beat_env_beat_defaults() -> None:
    env = {
        "VEIL_NODE_NAME": "from-env",
        "VEIL_DRAIN_GRACE_PERIOD": "5s",
        "VEIL_CERT_TTL": "2h",
        "VEIL_STATE_DIR": "/tmp/x",
        "VEIL_ADMIN_ADDRESS": "[::1]:16000",
    }
    c = parse(["--drain-grace-period", "500ms"], env)
    assert c.node_name == "from-env"
    assert c.drain_grace_period == 0.5
    assert c.cert_ttl == 7200.0
    assert c.state_dir == Path("/tmp/x")
    assert c.admin_address == ("::1", 16000)


def test_typed_values_are_accepted() -> None:
    c = config_from_args(
        {"node_name": "n1", "hbone_port": 0, "outbound_port": 0, "inbound_plaintext_port": 0}, {}
    )
    assert c.hbone_port == 0


@pytest.mark.parametrize(
    ("argv", "env", "match"),
    [
        ([], {}, "no node name"),
        (["--node-name", "Node_A"], {}, "node_name"),
        (["--node-name", "n", "--admin-address", "0.0.0.0:15000"], {}, "loopback"),
        (["--node-name", "n", "--admin-address", "10.0.0.1:15000"], {}, "loopback"),
        (["--node-name", "n", "--hbone-port", "15001"], {}, "not distinct"),
        (["--node-name", "n", "--hbone-port", "70000"], {}, "not a TCP port"),
        (["--node-name", "n"], {"VEIL_DRAIN_GRACE_PERIOD": "soon"}, "VEIL_DRAIN_GRACE_PERIOD"),
        (["--node-name", "n", "--pool-idle-timeout", "0"], {}, "positive"),
        (["--node-name", "n", "--metrics-address", "nowhere"], {}, "--metrics-address"),
        (["--node-name", "n", "--listen-address", "eth0"], {}, "listen_address"),
        (["--node-name", "n", "--log-level", "loud"], {}, "log_level"),
        (["--node-name", "n", "--xds-backoff-max", "10ms"], {}, "xds_backoff_max"),
        (["--node-name", "n", "--cert-ttl", "100ms"], {}, "cert_ttl"),
    ],
)
def test_invalid_values_say_what_and_where(
    argv: list[str], env: dict[str, str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        parse(argv, env)
    assert exc.value.hint


def test_config_is_frozen() -> None:
    c = parse(["--node-name", "n"])
    with pytest.raises(AttributeError):
        c.node_name = "m"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("25s", 25),
        ("500ms", 0.5),
        ("5m", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("7", 7),
        ("1.5s", 1.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "-1s", "5 weeks", "1e3"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "hp"),
    [
        ("127.0.0.1:15000", ("127.0.0.1", 15000)),
        ("[::1]:1", ("::1", 1)),
        (":15020", ("0.0.0.0", 15020)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_host_port(text: str, hp: tuple[str, int]) -> None:
    assert parse_host_port(text) == hp


@pytest.mark.parametrize("text", ["15000", "host:1", "1.2.3.4:99999", "[::1]15000", "1.2.3.4:x"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)
