"""ControllerConfig: flags over VEIL_* variables over defaults, validated with clear messages."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest

from controller.config import (
    ConfigError,
    ControllerConfig,
    ListenAddress,
    add_run_arguments,
    parse_duration,
    parse_listen_address,
)


def config(argv: list[str], env: dict[str, str] | None = None) -> ControllerConfig:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return ControllerConfig.from_args(parser.parse_args(argv), env or {})


def test_defaults() -> None:
    c = config([])
    assert c.registry is None
    assert c.state_dir == Path("/var/lib/veil/controller")
    assert c.listen == ListenAddress("0.0.0.0", 15012)
    assert c.join_listen == ListenAddress("0.0.0.0", 15013)
    assert c.trust_domain == "cluster.local"
    assert c.default_ttl == c.max_ttl == c.node_cert_ttl == timedelta(hours=24)
    assert c.registry_poll == 0.5


def test_flag_beats_environment_beats_default(tmp_path: Path) -> None:
    registry = tmp_path / "r.yaml"
    registry.write_text("")
    env = {
        "VEIL_LISTEN": "127.0.0.1:7000",
        "VEIL_TRUST_DOMAIN": "example.org",
        "VEIL_DEFAULT_TTL": "4h",
        "VEIL_REGISTRY": str(registry),
    }
    c = config(["--listen", "[::1]:7001"], env)
    assert c.listen == ListenAddress("::1", 7001)
    assert str(c.listen) == "[::1]:7001"
    assert c.trust_domain == "example.org"
    assert c.default_ttl == timedelta(hours=4)
    assert c.registry == registry


def test_registry_may_be_a_directory(tmp_path: Path) -> None:
    assert config(["--registry", str(tmp_path)]).registry == tmp_path


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["--listen", "localhost:15012"],
            {},
            "--listen: invalid listen address: 'localhost' is not an IP",
        ),
        (["--listen", "0.0.0.0:99999"], {}, "is not a port number"),
        (
            [],
            {"VEIL_JOIN_LISTEN": "0.0.0.0:15012"},
            "VEIL_JOIN_LISTEN (environment): the join listener",
        ),
        (["--trust-domain", "Cluster.Local"], {}, "--trust-domain: invalid trust domain"),
        (["--default-ttl", "1y"], {}, "--default-ttl: '1y' is not a duration"),
        (["--max-ttl", "0"], {}, "--max-ttl: '0' is not a positive duration"),
        (["--default-ttl", "48h"], {}, "48h exceeds --max-ttl 24h"),
        (["--ca-cert", "/etc/hosts"], {}, "needs both --ca-cert and --ca-key"),
        (
            ["--ca-cert", "/nope", "--ca-key", "/nope"],
            {},
            "--ca-cert: /nope is not a readable file",
        ),
        (["--registry", "/nope/registry.yaml"], {}, "is neither a file nor a directory"),
        (["--registry-poll", "fast"], {}, "is not a number"),
        (["--registry-poll", "0"], {}, "out of range"),
    ],
)
def test_invalid_settings_name_the_flag_or_variable(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config(argv, env)
    assert message in str(info.value)
    assert info.value.hint


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1h30m", 5400), ("2d", 172800), ("1d2h3m4s", 93784)],
)
def test_parse_duration(text: str, expected: int) -> None:
    assert parse_duration(text) == timedelta(seconds=expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", ListenAddress("1.2.3.4", 15012)),
        (":9", ListenAddress("0.0.0.0", 9)),
        ("[::]:0", ListenAddress("::", 0)),
        ("::1", ListenAddress("::1", 15012)),
    ],
)
def test_parse_listen_address(text: str, expected: ListenAddress) -> None:
    assert parse_listen_address(text, 15012) == expected
