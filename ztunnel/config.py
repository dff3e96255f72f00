"""The ztunnel's one configuration object, built once at startup.

:class:`ZtunnelConfig` is frozen and validated; every component receives it
(or the few fields it needs). Values come from, in order of precedence,
command-line flags, ``VEIL_*`` environment variables and safe defaults. Every
invalid value is reported with the flag and variable that set it and what a
valid value looks like.
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from node.backoff import Backoff
from node.dataplane import (
    ADMIN_PORT,
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    READINESS_PORT,
)
from veil.settings import Setting, add_setting_arguments, dataclass_defaults, resolve_settings

from .errors import ConfigError

__all__ = [
    "DEFAULT_STATE_DIR",
    "SpliceMode",
    "ZtunnelConfig",
    "add_config_arguments",
    "config_fields",
    "config_from_args",
    "is_loopback",
    "parse_duration",
    "parse_host_port",
]

DEFAULT_STATE_DIR = Path("/var/lib/veil/node")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# Kept in step with ztunnel.workers.supervision.MAX_WORKERS (config cannot
# import the workers package: it imports the config).
_MAX_WORKERS = 64
_NODE_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class SpliceMode(enum.StrEnum):
    """When a same-node connection is spliced in the kernel (perf/README.md).

    ``always`` splices at once: lowest latency, but bulk runs below the
    Python relay. ``auto`` starts on the relay and hands interactive
    connections to the splice (ztunnel.proxy.splice.promotion_decision).
    ``off`` keeps every connection on the relay.
    """

    AUTO = "auto"
    ALWAYS = "always"
    OFF = "off"


def _splice_mode(text: str) -> SpliceMode:
    try:
        return SpliceMode(text.strip().lower())
    except ValueError:
        raise ValueError(f"{text!r} is not one of auto, always, off") from None


def parse_duration(text: str) -> float:
    """``"25s"``, ``"500ms"``, ``"5m"``, ``"2h"``, ``"1d"`` or plain seconds, as seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 25s, 500ms, 5m, 2h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_host_port(text: str) -> tuple[str, int]:
    """``"127.0.0.1:15000"``, ``"[::1]:15000"`` or ``":15000"`` (all addresses)."""
    t = text.strip()
    if t.startswith("["):
        host, sep, port = t[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [IPv6]:port")
    else:
        host, sep, port = t.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not host:port")
        host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    p = int(port) if port.isdigit() else -1
    if not 0 <= p <= 65535:
        raise ValueError(f"{text!r}: port must be 0-65535")
    return host, p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ZtunnelConfig:
    """Everything the ztunnel process is told at startup (durations in seconds)."""

    node_name: str
    state_dir: Path = DEFAULT_STATE_DIR
    # None: use the address the node stored when it joined.
    controller_address: str | None = None
    listen_address: str = "0.0.0.0"
    outbound_port: int = OUTBOUND_PORT
    inbound_plaintext_port: int = INBOUND_PLAINTEXT_PORT
    hbone_port: int = HBONE_PORT
    admin_address: tuple[str, int] = ("127.0.0.1", ADMIN_PORT)
    metrics_address: tuple[str, int] = ("0.0.0.0", METRICS_PORT)
    readiness_address: tuple[str, int] = ("0.0.0.0", READINESS_PORT)
    # Readiness and liveness for this instance alone on a 0600 unix socket
    # (ztunnel.admin.health_socket); the DaemonSet's exec probes read it,
    # because :15021 is shared with a surge pod through SO_REUSEPORT.
    health_socket: Path | None = None
    drain_grace_period: float = 25.0
    # Requested workload certificate lifetime; None lets the controller decide.
    cert_ttl: float | None = None
    # Write workload keys to this directory (0600) instead of memory only.
    key_dir: Path | None = None
    pool_idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    xds_backoff_initial: float = 0.5
    xds_backoff_max: float = 30.0
    cert_retry_initial: float = 1.0
    cert_retry_max: float = 60.0
    metrics_max_label_sets: int = 10_000
    log_level: str = "INFO"
    # The agent's bpffs pin directory: the same-node kernel splice lives there.
    pin_dir: Path = Path("/sys/fs/bpf/veil")
    # When same-node connections use that splice. auto: bulk stays on the
    # Python relay (never slower than it), conversations get the splice's
    # latency (perf/README.md); off is the fallback if promotion misbehaves.
    same_node_splice: SpliceMode = SpliceMode.AUTO
    # Worker processes sharing the listeners (SO_REUSEPORT); None: one per
    # CPU this process may use, capped (ztunnel.workers.supervision).
    workers: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.same_node_splice, SpliceMode):
            # Typed values come as plain strings across the worker channel (JSON).
            try:
                mode = _splice_mode(str(self.same_node_splice))
            except ValueError as e:
                raise _err("same_node_splice", str(e), "use auto, always or off") from None
            object.__setattr__(self, "same_node_splice", mode)
        _validate(self)

    def cert_manager_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`ztunnel.identity.CertManager` (one place for
        the single-process ztunnel and the workers' supervisor)."""
        return {
            "ttl": timedelta(seconds=self.cert_ttl) if self.cert_ttl else None,
            "retry_initial": self.cert_retry_initial,
            "retry_max": self.cert_retry_max,
            "request_timeout": self.connect_timeout,
            "key_dir": self.key_dir,
        }

    def watch_backoff(self) -> Backoff:
        """The controller watch's reconnect backoff."""
        return Backoff(self.xds_backoff_initial, self.xds_backoff_max)


def _err(field_name: str, message: str, hint: str) -> ConfigError:
    spec = _SPECS_BY_FIELD.get(field_name)
    where = f" ({spec.flag} / {spec.env})" if spec is not None else ""
    return ConfigError(f"invalid {field_name}{where}: {message}", hint=hint)


def _validate(c: ZtunnelConfig) -> None:
    if not _NODE_RE.match(c.node_name or ""):
        raise _err(
            "node_name",
            f"{c.node_name!r} is not a Kubernetes node name",
            "set --node-name or VEIL_NODE_NAME (in a DaemonSet: spec.nodeName via the downward API)",
        )
    for name in ("outbound_port", "inbound_plaintext_port", "hbone_port"):
        port = getattr(c, name)
        if not 0 <= port <= 65535:
            raise _err(name, f"{port} is not a TCP port", "use 1-65535 (0 only in tests)")
    ports = [c.outbound_port, c.inbound_plaintext_port, c.hbone_port]
    nonzero = [p for p in ports if p]
    if len(set(nonzero)) != len(nonzero):
        raise _err(
            "hbone_port",
            f"listener ports {ports} are not distinct",
            "give 15001, 15006 and 15008 (the defaults) or three different ports",
        )
    try:
        ipaddress.ip_address(c.listen_address)
    except ValueError:
        raise _err(
            "listen_address", f"{c.listen_address!r} is not an IP address", "e.g. 0.0.0.0"
        ) from None
    if not is_loopback(c.admin_address[0]):
        raise _err(
            "admin_address",
            f"{c.admin_address[0]} is not a loopback address",
            "the admin API exposes state and must stay on 127.0.0.1 or ::1; "
            "use the metrics and readiness addresses for remote scraping",
        )
    for name in (
        "drain_grace_period",
        "pool_idle_timeout",
        "connect_timeout",
        "xds_backoff_initial",
        "xds_backoff_max",
        "cert_retry_initial",
        "cert_retry_max",
    ):
        value = getattr(c, name)
        if not value > 0:
            raise _err(name, f"{value} must be positive", "give a duration such as 25s or 5m")
    if c.xds_backoff_max < c.xds_backoff_initial:
        raise _err("xds_backoff_max", "is below the initial backoff", "raise the maximum")
    if c.cert_retry_max < c.cert_retry_initial:
        raise _err("cert_retry_max", "is below the initial retry delay", "raise the maximum")
    if c.cert_ttl is not None and c.cert_ttl < 1:
        raise _err(
            "cert_ttl", f"{c.cert_ttl}s is too short", "use at least 1s; a few hours in production"
        )
    if c.metrics_max_label_sets < 1:
        raise _err("metrics_max_label_sets", "must be at least 1", "the default is 10000")
    if c.workers is not None and not 1 <= c.workers <= _MAX_WORKERS:
        raise _err(
            "workers",
            f"{c.workers} is not a worker count",
            f"use 1-{_MAX_WORKERS}, or leave it unset for one per CPU (at most 8)",
        )
    # sun_path holds 108 bytes; the atomic bind uses a longer temporary name.
    if c.health_socket is not None and len(os.fsencode(c.health_socket)) > 80:
        raise _err(
            "health_socket",
            f"{c.health_socket} is too long for a unix socket path",
            "use a path under 80 bytes, e.g. /var/run/veil-ztunnel/health.sock",
        )
    if c.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise _err(
            "log_level", f"{c.log_level!r} is not a level", "use DEBUG, INFO, WARNING or ERROR"
        )


def _path(text: str) -> Path:
    if not text:
        raise ValueError("empty path")
    return Path(text)


def _optional_duration(text: str) -> float | None:
    return None if text.strip() in ("", "0") else parse_duration(text)


def _port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a port number")
    return int(text)


def _int(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


_SPECS = (
    Setting("node_name", "--node-name", "VEIL_NODE_NAME", str, "this node's name (required)"),
    Setting("state_dir", "--state-dir", "VEIL_STATE_DIR", _path, "node credentials directory"),
    Setting(
        "controller_address",
        "--controller-address",
        "VEIL_CONTROLLER_ADDRESS",
        str,
        "controller host:port (default: the address stored at join)",
    ),
    Setting(
        "listen_address",
        "--listen-address",
        "VEIL_LISTEN_ADDRESS",
        str,
        "address of the 15001/15006/15008 listeners",
    ),
    Setting(
        "outbound_port", "--outbound-port", "VEIL_OUTBOUND_PORT", _port, "outbound capture port"
    ),
    Setting(
        "inbound_plaintext_port",
        "--inbound-plaintext-port",
        "VEIL_INBOUND_PLAINTEXT_PORT",
        _port,
        "inbound plaintext port",
    ),
    Setting("hbone_port", "--hbone-port", "VEIL_HBONE_PORT", _port, "HBONE (mTLS) port"),
    Setting(
        "admin_address",
        "--admin-address",
        "VEIL_ADMIN_ADDRESS",
        parse_host_port,
        "admin API host:port (loopback only)",
    ),
    Setting(
        "metrics_address",
        "--metrics-address",
        "VEIL_METRICS_ADDRESS",
        parse_host_port,
        "Prometheus host:port",
    ),
    Setting(
        "readiness_address",
        "--readiness-address",
        "VEIL_READINESS_ADDRESS",
        parse_host_port,
        "readiness probe host:port",
    ),
    Setting(
        "health_socket",
        "--health-socket",
        "VEIL_ZTUNNEL_HEALTH_SOCKET",
        _path,
        "also answer readiness/liveness for this instance on this unix socket (mode 0600; "
        "read by `veil ztunnel health`)",
    ),
    Setting(
        "drain_grace_period",
        "--drain-grace-period",
        "VEIL_DRAIN_GRACE_PERIOD",
        parse_duration,
        "how long to let connections finish at shutdown",
    ),
    Setting(
        "cert_ttl",
        "--cert-ttl",
        "VEIL_CERT_TTL",
        _optional_duration,
        "requested workload certificate lifetime (default: controller's)",
    ),
    Setting(
        "key_dir",
        "--key-dir",
        "VEIL_KEY_DIR",
        _path,
        "keep workload keys in 0600 files here (default: memory only)",
    ),
    Setting(
        "pool_idle_timeout",
        "--pool-idle-timeout",
        "VEIL_POOL_IDLE_TIMEOUT",
        parse_duration,
        "close idle pooled HBONE connections after this long",
    ),
    Setting(
        "connect_timeout",
        "--connect-timeout",
        "VEIL_CONNECT_TIMEOUT",
        parse_duration,
        "upstream connect timeout",
    ),
    Setting(
        "xds_backoff_initial",
        "--xds-backoff-initial",
        "VEIL_XDS_BACKOFF_INITIAL",
        parse_duration,
        "first controller reconnect delay",
    ),
    Setting(
        "xds_backoff_max",
        "--xds-backoff-max",
        "VEIL_XDS_BACKOFF_MAX",
        parse_duration,
        "largest controller reconnect delay",
    ),
    Setting(
        "cert_retry_initial",
        "--cert-retry-initial",
        "VEIL_CERT_RETRY_INITIAL",
        parse_duration,
        "first certificate retry delay",
    ),
    Setting(
        "cert_retry_max",
        "--cert-retry-max",
        "VEIL_CERT_RETRY_MAX",
        parse_duration,
        "largest certificate retry delay",
    ),
    Setting(
        "metrics_max_label_sets",
        "--metrics-max-label-sets",
        "VEIL_METRICS_MAX_LABEL_SETS",
        _int,
        "cap on distinct label sets per metric",
    ),
    Setting("log_level", "--log-level", "VEIL_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR"),
    Setting(
        "pin_dir",
        "--pin-dir",
        "VEIL_PIN_DIR",
        _path,
        "the agent's bpffs pin directory (same-node kernel splice)",
    ),
    Setting(
        "same_node_splice",
        "--same-node-splice",
        "VEIL_SAME_NODE_SPLICE",
        _splice_mode,
        "same-node kernel splice: auto (relay first, splice interactive connections), "
        "always, or off (Python relay only)",
        metavar="{auto,always,off}",
    ),
    Setting(
        "workers",
        "--workers",
        "VEIL_ZTUNNEL_WORKERS",
        _int,
        "worker processes sharing the listeners (default: one per usable CPU, at most 8; "
        "1 runs a single process)",
    ),
)
_SPECS_BY_FIELD = {s.field: s for s in _SPECS}


def config_fields() -> dict[str, tuple[str, str]]:
    """``field -> (flag, env var)`` for every config field (docs and tests use it)."""
    return {s.field: (s.flag, s.env) for s in _SPECS}


def add_config_arguments(parser: argparse.ArgumentParser, *, skip: Iterable[str] = ()) -> None:
    """Adds one flag per config field; flags default to unset so env vars can apply."""
    add_setting_arguments(parser, _SPECS, skip=skip, defaults=dataclass_defaults(ZtunnelConfig))


def config_from_args(
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ZtunnelConfig:
    """Builds the config: flags beat ``VEIL_*`` variables beat defaults.

    ``args`` values may be strings (from argparse) or already-typed values.
    Raises :class:`~ztunnel.errors.ConfigError` naming the flag and variable.
    """
    env = os.environ if environ is None else environ
    values = resolve_settings(_SPECS, args, env, ConfigError)
    if "node_name" not in values:
        raise ConfigError(
            "no node name given",
            hint="run `veil node join` first (the ztunnel reads the node name from --state-dir), "
            "or set --node / VEIL_NODE_NAME (in a DaemonSet: spec.nodeName via the downward API)",
        )
    return ZtunnelConfig(**values)
