"""The node agent's one configuration, built once from flags and ``VEIL_*`` variables.

Precedence: command-line flag, then environment variable, then default. Every
rejected value names the flag and the variable and says what a valid value
looks like. The defaults are the production ones: the host's bpffs pins, the
status socket under /run/veil, the credentials ``veil node join`` wrote.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any, Final

from agent.bpf.pins import DEFAULT_PIN_DIR, validate_pin_dir
from agent.bpf.programs import DataplaneOptions
from agent.errors import BpfError
from veil.settings import Setting, add_setting_arguments, dataclass_defaults, resolve_settings

from .errors import AgentConfigError
from .metrics import DEFAULT_METRICS_ADDRESS, parse_metrics_address

__all__ = [
    "DEFAULT_STATE_DIR",
    "DEFAULT_STATUS_SOCKET",
    "AgentConfig",
    "add_config_arguments",
    "config_fields",
    "config_from_args",
    "parse_probe_sources",
]

DEFAULT_STATE_DIR: Final = Path("/var/lib/veil/node")
DEFAULT_STATUS_SOCKET: Final = Path("/run/veil/agent.sock")
# Kubernetes node names are DNS subdomains (RFC 1123).
_NODE_RE: Final = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
# Linux IFNAMSIZ is 16 including the NUL; '/' and whitespace are never valid.
_IFNAME_RE: Final = re.compile(r"^[^/\s:]{1,15}$")
# sun_path is 108 bytes including the NUL.
_MAX_SOCKET_PATH: Final = 107


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``veil agent run`` is told at startup (durations in seconds)."""

    # None: the node name stored by `veil node join` in state_dir.
    node: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    pin_dir: Path = DEFAULT_PIN_DIR
    # None: the interface of the route to the controller (else the default route).
    uplink: str | None = None
    status_socket: Path = DEFAULT_STATUS_SOCKET
    # The kubelet's source addresses for probes (at most one IPv4 and one
    # IPv6); allowed through the egress guard.
    probe_sources: tuple[IPv4Address | IPv6Address, ...] = ()
    drop_udp: bool = False
    # ICMP/ICMPv6 echo to and from enrolled pods; dropped by default because an
    # echo payload is a data channel no policy sees. Errors and ND always pass.
    allow_icmp_echo: bool = False
    # Full reconcile against the kernel even without a registry change (drift repair).
    resync_interval: float = 30.0
    # First retry delay for pods whose veth does not exist yet (doubles up to 5 s).
    veth_retry: float = 0.2
    # Prometheus endpoint (host, port); None: off.
    metrics_address: tuple[str, int] | None = DEFAULT_METRICS_ADDRESS

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def probe_source(self) -> IPv4Address | None:
        """The IPv4 probe source (config map: changes without a reload)."""
        return next((a for a in self.probe_sources if isinstance(a, IPv4Address)), None)

    @property
    def probe_source6(self) -> IPv6Address | None:
        """The IPv6 probe source (a build flag of the egress guard)."""
        return next((a for a in self.probe_sources if isinstance(a, IPv6Address)), None)

    def dataplane_options(self) -> DataplaneOptions:
        """The compile-time data-plane choices this configuration makes."""
        return DataplaneOptions(
            drop_udp=self.drop_udp,
            allow_icmp_echo=self.allow_icmp_echo,
            probe_source6=self.probe_source6,
        )


def _err(field_name: str, message: str, hint: str) -> AgentConfigError:
    spec = _SPECS_BY_FIELD.get(field_name)
    where = f" ({spec.flag} / {spec.env})" if spec is not None else ""
    return AgentConfigError(f"invalid {field_name}{where}: {message}", hint=hint)


def _validate(c: AgentConfig) -> None:
    if c.node is not None and not _NODE_RE.match(c.node):
        raise _err(
            "node",
            f"{c.node!r} is not a Kubernetes node name",
            "use lower-case letters, digits, '-' and '.' (in a DaemonSet: spec.nodeName via the "
            "downward API), or leave it unset to use the name stored by `veil node join`",
        )
    try:
        validate_pin_dir(c.pin_dir)
    except BpfError as exc:
        raise _err("pin_dir", exc.message, exc.hint or "") from None
    if c.uplink is not None and not _IFNAME_RE.match(c.uplink):
        raise _err(
            "uplink",
            f"{c.uplink!r} is not an interface name",
            "give the node's uplink as `ip link` shows it (at most 15 characters), e.g. eth0, "
            "or leave it unset to use the interface of the route to the controller",
        )
    if not c.status_socket.is_absolute():
        raise _err(
            "status_socket", f"{c.status_socket} is not absolute", "e.g. /run/veil/agent.sock"
        )
    if len(str(c.status_socket).encode()) > _MAX_SOCKET_PATH:
        raise _err(
            "status_socket",
            f"{c.status_socket} is longer than {_MAX_SOCKET_PATH} bytes",
            "unix socket paths are limited to 107 bytes; pick a shorter path",
        )
    if not c.state_dir.is_absolute():
        raise _err("state_dir", f"{c.state_dir} is not absolute", "e.g. /var/lib/veil/node")
    for addr in c.probe_sources:
        if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
            raise _err(
                "probe_sources",
                f"{addr} cannot be a probe source",
                "give the node address the kubelet probes pods from, or leave it unset",
            )
    for family in (4, 6):
        same = [str(a) for a in c.probe_sources if a.version == family]
        if len(same) > 1:
            raise _err(
                "probe_sources",
                f"several IPv{family} probe sources ({', '.join(same)})",
                "give at most one IPv4 and one IPv6 address: the ones the kubelet probes from",
            )
    if not 0 < c.resync_interval <= 86400:
        raise _err(
            "resync_interval", f"{c.resync_interval}s is out of range", "use 1s to 24h, e.g. 30s"
        )
    if not 0 < c.veth_retry <= 60:
        raise _err("veth_retry", f"{c.veth_retry}s is out of range", "use 10ms to 60s, e.g. 200ms")


# -- parsing -------------------------------------------------------------------------

_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS: Final[dict[str | None, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


def parse_duration(text: str) -> float:
    """``"30s"``, ``"200ms"``, ``"5m"``, ``"1h"`` or plain seconds, as seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 200ms, 5m)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use 1/0, true/false, yes/no)")


def _path(text: str) -> Path:
    if not text:
        raise ValueError("empty path")
    return Path(text)


def parse_probe_sources(text: str) -> tuple[IPv4Address | IPv6Address, ...]:
    """``"10.0.0.5"``, ``"fd00::5"`` or ``"10.0.0.5,fd00::5"``: the probe sources."""
    out: list[IPv4Address | IPv6Address] = []
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        try:
            addr = ip_address(item)
        except ValueError:
            raise ValueError(f"{item!r} is not an IPv4 or IPv6 address") from None
        if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr not in out:
            out.append(addr)
    return tuple(out)


_SPECS: Final = (
    Setting(
        "node",
        "--node",
        "VEIL_NODE_NAME",
        str,
        "this node's name (default: the name stored by `veil node join`)",
    ),
    Setting(
        "state_dir",
        "--state-dir",
        "VEIL_STATE_DIR",
        _path,
        f"node credentials directory shared with the ztunnel (default {DEFAULT_STATE_DIR})",
    ),
    Setting(
        "pin_dir",
        "--pin-dir",
        "VEIL_PIN_DIR",
        _path,
        f"bpffs directory for Veil's maps and programs (default {DEFAULT_PIN_DIR})",
    ),
    Setting(
        "uplink",
        "--uplink",
        "VEIL_UPLINK",
        str,
        "the node's uplink interface (default: the route to the controller)",
    ),
    Setting(
        "status_socket",
        "--status-socket",
        "VEIL_AGENT_SOCKET",
        _path,
        f"unix socket of the status API read by veilctl (default {DEFAULT_STATUS_SOCKET})",
    ),
    Setting(
        "probe_sources",
        "--probe-source",
        "VEIL_PROBE_SOURCE",
        parse_probe_sources,
        "node address(es) kubelet probes come from, let through the egress guard: "
        "one IPv4 and/or one IPv6, comma-separated or the flag repeated",
    ),
    Setting(
        "drop_udp",
        "--drop-udp",
        "VEIL_DROP_UDP",
        parse_bool,
        "drop enrolled pods' non-DNS UDP (the mesh cannot police it)",
        is_switch=True,
    ),
    Setting(
        "allow_icmp_echo",
        "--allow-icmp-echo",
        "VEIL_ALLOW_ICMP_ECHO",
        parse_bool,
        "let ping (ICMP/ICMPv6 echo) reach and leave enrolled pods; by default it is "
        "dropped and counted, ICMP errors and neighbour discovery always pass",
        is_switch=True,
    ),
    Setting(
        "resync_interval",
        "--resync-interval",
        "VEIL_RESYNC_INTERVAL",
        parse_duration,
        "full reconcile against the kernel this often (default 30s)",
    ),
    Setting(
        "veth_retry",
        "--veth-retry",
        "VEIL_VETH_RETRY",
        parse_duration,
        "first retry delay for pods whose veth is not there yet (default 200ms)",
    ),
    Setting(
        "metrics_address",
        "--metrics-address",
        "VEIL_AGENT_METRICS_ADDRESS",
        parse_metrics_address,
        "HOST:PORT of the Prometheus /metrics endpoint, or off "
        f"(default {DEFAULT_METRICS_ADDRESS[0]}:{DEFAULT_METRICS_ADDRESS[1]})",
    ),
)
_SPECS_BY_FIELD: Final = {s.field: s for s in _SPECS}


def config_fields() -> dict[str, tuple[str, str]]:
    """``field -> (flag, env var)`` for every config field."""
    return {s.field: (s.flag, s.env) for s in _SPECS}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; flags default to unset so the environment can apply."""
    add_setting_arguments(
        parser, _SPECS, skip={"probe_sources"}, defaults=dataclass_defaults(AgentConfig)
    )
    spec = _SPECS_BY_FIELD["probe_sources"]
    parser.add_argument(
        spec.flag,
        dest=spec.field,
        action="append",
        default=None,
        metavar="ADDRESS",
        help=f"{spec.help} (env {spec.env})",
    )


def config_from_args(
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Flags beat ``VEIL_*`` variables beat defaults; AgentConfigError names the culprit."""
    env = os.environ if environ is None else environ
    given: Mapping[str, Any] | None = vars(args) if isinstance(args, argparse.Namespace) else args
    repeated = (given or {}).get("probe_sources")
    if isinstance(repeated, list):
        # The flag repeated (argparse "append"): one comma list, parsed as such.
        given = {**(given or {}), "probe_sources": ",".join(map(str, repeated))}
    return AgentConfig(**resolve_settings(_SPECS, given, env, AgentConfigError))
