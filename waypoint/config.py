"""The waypoint's one Config: built once from flags and ``VEIL_*`` variables.

The waypoint is a node of its own for the controller (``veil node join``
stores its credentials in ``state_dir``), and a workload of the registry: a
Workload on that node in ``namespace`` with service account
``service_account`` and the label ``veil.io/waypoint=<name>``. That workload
is what lets the controller sign the waypoint's identity
``spiffe://<td>/ns/<namespace>/sa/<service_account>`` for this node.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.settings import Setting, add_setting_arguments, resolve_settings

from .errors import WaypointConfigError

__all__ = ["WaypointConfig", "add_config_arguments", "config_from_args"]

HBONE_PORT = 15008


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise ValueError(f"{text!r} is not a port (0-65535)")
    return int(text)


def _seconds(text: str) -> float:
    t = text.strip().lower()
    factor = 1.0
    for suffix, f in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if t.endswith(suffix):
            t, factor = t[: -len(suffix)], f
            break
    value = float(t) * factor
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    return value


@dataclass(frozen=True, slots=True)
class WaypointConfig:
    node_name: str
    namespace: str
    name: str
    service_account: str = ""  # "" means the same as name
    state_dir: Path = Path("/var/lib/veil")
    controller_address: str | None = None
    listen_address: str = "0.0.0.0"
    hbone_port: int = HBONE_PORT
    # The HBONE port dialled on endpoints' nodes (tests run nodes on other ports).
    peer_hbone_port: int = HBONE_PORT
    admin_address: tuple[str, int] = ("127.0.0.1", 15000)
    metrics_address: tuple[str, int] = ("0.0.0.0", 15020)
    connect_timeout: float = 10.0
    drain_grace_period: float = 10.0
    jwks_refresh: float = 300.0
    # Request bodies stream through (bounded memory), so no size limit by
    # default; a positive value answers 413 past it.
    max_body: int = 0
    idle_timeout: float = 300.0
    metrics_max_label_sets: int = 2000

    def __post_init__(self) -> None:
        for field_name in ("node_name", "namespace", "name"):
            if not getattr(self, field_name):
                raise WaypointConfigError(
                    f"the waypoint needs --{field_name.replace('_', '-')}",
                    hint="see `veil waypoint run --help`; the waypoint's Workload in the "
                    "registry names its node, namespace and waypoint name",
                )
        try:
            admin_loopback = ipaddress.ip_address(self.admin_address[0]).is_loopback
        except ValueError:
            admin_loopback = self.admin_address[0] == "localhost"
        if not admin_loopback:
            raise WaypointConfigError(
                f"admin address {self.admin_address[0]} is not loopback",
                hint="the admin API serves config dumps: bind it to 127.0.0.1 or ::1",
            )

    @property
    def sa(self) -> str:
        return self.service_account or self.name


_SETTINGS = (
    Setting("node_name", "--node", "VEIL_NODE_NAME", str, "the node name the waypoint joined as"),
    Setting("namespace", "--namespace", "VEIL_WAYPOINT_NAMESPACE", str, "the waypoint's namespace"),
    Setting("name", "--name", "VEIL_WAYPOINT_NAME", str, "the waypoint's name (veil.io/use-waypoint)"),
    Setting("service_account", "--service-account", "VEIL_WAYPOINT_SERVICE_ACCOUNT", str,
            "the waypoint's service account (default: its name)"),
    Setting("state_dir", "--state-dir", "VEIL_STATE_DIR", Path, "node credentials directory"),
    Setting("controller_address", "--controller-address", "VEIL_CONTROLLER_ADDRESS", str,
            "controller host:port (default: the address stored at join)"),
    Setting("listen_address", "--listen-address", "VEIL_LISTEN_ADDRESS", str,
            "address of the HBONE listener"),
    Setting("hbone_port", "--hbone-port", "VEIL_HBONE_PORT", _port, "HBONE (mTLS) port"),
    Setting("peer_hbone_port", "--peer-hbone-port", "VEIL_PEER_HBONE_PORT", _port,
            "HBONE port of the endpoints' nodes"),
    Setting("admin_address", "--admin-address", "VEIL_ADMIN_ADDRESS", _host_port,
            "admin API host:port (loopback only)"),
    Setting("metrics_address", "--metrics-address", "VEIL_METRICS_ADDRESS", _host_port,
            "Prometheus host:port"),
    Setting("connect_timeout", "--connect-timeout", "VEIL_CONNECT_TIMEOUT", _seconds,
            "upstream connect timeout"),
    Setting("drain_grace_period", "--drain-grace-period", "VEIL_DRAIN_GRACE_PERIOD", _seconds,
            "how long to let tunnels finish at shutdown"),
    Setting("jwks_refresh", "--jwks-refresh", "VEIL_JWKS_REFRESH", _seconds,
            "how often jwksUri documents are fetched again"),
)  # fmt: skip


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_arguments(parser, _SETTINGS)


def config_from_args(
    args: argparse.Namespace | Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> WaypointConfig:
    values = resolve_settings(
        _SETTINGS, args, os.environ if environ is None else environ, WaypointConfigError
    )
    for required in ("node_name", "namespace", "name"):
        values.setdefault(required, "")
    return WaypointConfig(**values)
