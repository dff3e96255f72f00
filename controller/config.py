"""The controller's one configuration, built once from flags and ``VEIL_*`` variables.

:func:`add_run_arguments` declares the ``veil controller run`` flags; every flag
has an environment variable (named in its help), and a flag given on the
command line wins over the variable. :meth:`ControllerConfig.from_args`
validates everything before anything starts, so a typo fails at once with a
message that says which setting is wrong and what a valid value looks like.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from controller.api.ports import CONTROLLER_JOIN_PORT, CONTROLLER_PORT
from controller.api.spiffe import DEFAULT_TRUST_DOMAIN, InvalidSpiffeId, validate_trust_domain
from controller.errors import ControllerError

__all__ = [
    "DEFAULT_STATE_DIR",
    "ConfigError",
    "ControllerConfig",
    "ListenAddress",
    "add_run_arguments",
    "parse_duration",
    "parse_listen_address",
]

DEFAULT_STATE_DIR = Path("/var/lib/veil/controller")
_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_UNITS = (86400, 3600, 60, 1)


class ConfigError(ControllerError):
    """A controller setting is invalid; the message names the flag and variable."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str  # an IP address; "0.0.0.0" or "::" means every interface
    port: int  # 0 picks a free port (tests)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def unspecified(self) -> bool:
        return ipaddress.ip_address(self.host).is_unspecified


def parse_listen_address(text: str, default_port: int) -> ListenAddress:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every interface)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"cannot parse {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif text.count(":") > 1:
        host, port_text = text, ""  # a bare IPv6 address
    else:
        host, port_text = text, ""
    host = host or "0.0.0.0"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if not port_text:
        return ListenAddress(host, default_port)
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{port_text!r} is not a port number 0-65535")
    return ListenAddress(host, int(port_text))


def parse_duration(text: str) -> timedelta:
    """``3600``, ``90s``, ``15m``, ``1h30m``, ``2d``: a positive duration."""
    text = text.strip()
    if text.isdigit():
        seconds = int(text)
    else:
        m = _DURATION_RE.match(text)
        if not text or m is None:
            raise ValueError(f"{text!r} is not a duration (use e.g. 90s, 15m, 4h, 1h30m or 2d)")
        seconds = sum(int(v) * unit for v, unit in zip(m.groups(), _UNITS, strict=True) if v)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return timedelta(seconds=seconds)


# (dest, flag, env, help, default as text or None)
_SETTINGS: tuple[tuple[str, str, str, str, str | None], ...] = (
    (
        "source",
        "--source",
        "VEIL_SOURCE",
        "registry source: yaml (the --registry file) or kubernetes (the cluster's API)",
        "yaml",
    ),
    (
        "kube_api",
        "--kube-api",
        "VEIL_KUBE_API",
        "Kubernetes API server URL, to run --source kubernetes outside the cluster "
        "(default: the in-cluster ServiceAccount)",
        None,
    ),
    (
        "kube_token_file",
        "--kube-token-file",
        "VEIL_KUBE_TOKEN_FILE",
        "bearer token file for --kube-api",
        None,
    ),
    (
        "kube_ca_file",
        "--kube-ca-file",
        "VEIL_KUBE_CA_FILE",
        "CA bundle that signs the --kube-api server certificate",
        None,
    ),
    (
        "registry",
        "--registry",
        "VEIL_REGISTRY",
        "the YAML registry file (see docs/registry.md)",
        None,
    ),
    (
        "state_dir",
        "--state-dir",
        "VEIL_STATE_DIR",
        "CA and join-token state",
        str(DEFAULT_STATE_DIR),
    ),
    (
        "listen",
        "--listen",
        "VEIL_LISTEN",
        "main gRPC listener, mutual TLS with node certificates",
        f"0.0.0.0:{CONTROLLER_PORT}",
    ),
    (
        "join_listen",
        "--join-listen",
        "VEIL_JOIN_LISTEN",
        "join listener, server TLS only (Identity.JoinNode with a token)",
        f"0.0.0.0:{CONTROLLER_JOIN_PORT}",
    ),
    (
        "trust_domain",
        "--trust-domain",
        "VEIL_TRUST_DOMAIN",
        "the mesh trust domain",
        DEFAULT_TRUST_DOMAIN,
    ),
    ("default_ttl", "--default-ttl", "VEIL_DEFAULT_TTL", "workload certificate lifetime", "24h"),
    (
        "max_ttl",
        "--max-ttl",
        "VEIL_MAX_TTL",
        "longest workload certificate a node may ask for",
        "24h",
    ),
    ("node_cert_ttl", "--node-cert-ttl", "VEIL_NODE_CERT_TTL", "node certificate lifetime", "24h"),
    (
        "serving_cert_ttl",
        "--serving-cert-ttl",
        "VEIL_SERVING_CERT_TTL",
        "the controller's own TLS certificate lifetime (renewed at half-life)",
        "24h",
    ),
    ("ca_cert", "--ca-cert", "VEIL_CA_CERT", "plug in a signing CA certificate (PEM)", None),
    ("ca_key", "--ca-key", "VEIL_CA_KEY", "its private key (PEM, unencrypted)", None),
    (
        "ca_chain",
        "--ca-chain",
        "VEIL_CA_CHAIN",
        "certificates above --ca-cert up to the root",
        None,
    ),
    (
        "registry_poll",
        "--registry-poll",
        "VEIL_REGISTRY_POLL",
        "seconds between checks of the registry file",
        "0.5",
    ),
    (
        "registry_settle",
        "--registry-settle",
        "VEIL_REGISTRY_SETTLE",
        "seconds new registry content written in place must stay unchanged before it is "
        "parsed (adds to such a reload's latency; files replaced by rename wait 0.02)",
        "0.2",
    ),
    (
        "registry_hold",
        "--registry-hold",
        "VEIL_REGISTRY_HOLD",
        "seconds the registry must stay unchanged before a reload that removes every "
        "policy or most workloads is applied",
        "5",
    ),
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the ``veil controller run`` flags (defaults are applied in from_args)."""
    for dest, flag, env, text, default in _SETTINGS:
        shown = f"default {default}; " if default is not None else ""
        parser.add_argument(
            flag, dest=dest, default=None, metavar="VALUE", help=f"{text} ({shown}env {env})"
        )


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """Everything ``veil controller run`` needs, validated."""

    registry: Path | None
    state_dir: Path
    listen: ListenAddress
    join_listen: ListenAddress
    trust_domain: str
    default_ttl: timedelta
    max_ttl: timedelta
    node_cert_ttl: timedelta
    serving_cert_ttl: timedelta
    ca_cert: Path | None
    ca_key: Path | None
    ca_chain: Path | None
    registry_poll: float
    registry_settle: float = 0.2
    registry_hold: float = 5.0
    source: str = "yaml"
    kube_api: str | None = None
    kube_token_file: Path | None = None
    kube_ca_file: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> ControllerConfig:
        """Flags, then ``VEIL_*`` variables, then defaults; raises ConfigError."""
        raw: dict[str, str | None] = {}
        where: dict[str, str] = {}
        for dest, flag, env, _, default in _SETTINGS:
            value = getattr(args, dest, None)
            if value is not None:
                raw[dest], where[dest] = str(value), flag
            elif environ.get(env):
                raw[dest], where[dest] = environ[env], f"{env} (environment)"
            else:
                raw[dest], where[dest] = default, f"{flag} default"

        def fail(dest: str, problem: str, hint: str) -> ConfigError:
            return ConfigError(f"{where[dest]}: {problem}", hint=hint)

        def duration(dest: str) -> timedelta:
            try:
                return parse_duration(raw[dest] or "")
            except ValueError as e:
                raise fail(dest, str(e), "write e.g. 24h, 4h, 90m or 3600") from None

        def address(dest: str, default_port: int) -> ListenAddress:
            try:
                return parse_listen_address(raw[dest] or "", default_port)
            except ValueError as e:
                raise fail(
                    dest,
                    f"invalid listen address: {e}",
                    "write IP:PORT, e.g. 0.0.0.0:15012 or [::]:15012",
                ) from None

        def path(dest: str) -> Path | None:
            value = raw[dest]
            return Path(value) if value else None

        trust_domain = raw["trust_domain"] or ""
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeId as e:
            raise fail("trust_domain", e.message, e.hint or "e.g. cluster.local") from None
        listen = address("listen", CONTROLLER_PORT)
        join_listen = address("join_listen", CONTROLLER_JOIN_PORT)
        if (
            listen.port
            and listen.port == join_listen.port
            and (listen.host == join_listen.host or listen.unspecified or join_listen.unspecified)
        ):
            raise fail(
                "join_listen",
                f"the join listener {join_listen} collides with the mTLS listener {listen}",
                "the two listeners need different ports (defaults 15012 and 15013)",
            )
        default_ttl, max_ttl = duration("default_ttl"), duration("max_ttl")
        if default_ttl > max_ttl:
            raise fail(
                "default_ttl",
                # As the user wrote them ("48h exceeds --max-ttl 24h"), not as timedelta.
                f"the default certificate lifetime {raw['default_ttl']} exceeds --max-ttl "
                f"{raw['max_ttl']}",
                "lower --default-ttl or raise --max-ttl",
            )
        ca_cert, ca_key, ca_chain = path("ca_cert"), path("ca_key"), path("ca_chain")
        if (ca_cert is None) != (ca_key is None) or (ca_chain is not None and ca_cert is None):
            raise fail(
                "ca_cert" if ca_cert is not None else "ca_key",
                "a plugged-in CA needs both --ca-cert and --ca-key (and --ca-chain only with them)",
                "pass --ca-cert and --ca-key together, or neither to use the generated root",
            )
        for dest in ("ca_cert", "ca_key", "ca_chain"):
            p = path(dest)
            if p is not None and not p.is_file():
                raise fail(dest, f"{p} is not a readable file", "check the path")
        registry = path("registry")
        if registry is not None and not (registry.is_file() or registry.is_dir()):
            raise fail(
                "registry",
                f"{registry} is neither a file nor a directory",
                "pass the registry YAML file (see examples/registry.yaml) or a directory of them",
            )
        try:
            poll = float(raw["registry_poll"] or "")
        except ValueError:
            raise fail(
                "registry_poll", f"{raw['registry_poll']!r} is not a number", "e.g. 0.5"
            ) from None
        if not 0.05 <= poll <= 60:
            raise fail("registry_poll", f"{poll} s is out of range", "use 0.05 to 60 seconds")

        def seconds(dest: str, low: float, high: float, example: str) -> float:
            try:
                value = float(raw[dest] or "")
            except ValueError:
                raise fail(dest, f"{raw[dest]!r} is not a number", f"e.g. {example}") from None
            if not low <= value <= high:
                raise fail(dest, f"{value} s is out of range", f"use {low:g} to {high:g} seconds")
            return value

        settle = seconds("registry_settle", 0.0, 10.0, "0.2")
        hold = seconds("registry_hold", 0.0, 600.0, "5")
        source = raw["source"] or "yaml"
        if source not in ("yaml", "kubernetes"):
            raise fail("source", f"{source!r} is not a registry source", "use yaml or kubernetes")
        if source == "kubernetes" and (ca_cert is not None or registry is not None):
            raise fail(
                "source",
                "--registry and --ca-cert do not apply with --source kubernetes",
                "the cluster is the registry; plug in a CA with the Secret veil-system/cacerts",
            )
        kube_api = raw["kube_api"] or None
        kube_token_file = Path(raw["kube_token_file"]) if raw["kube_token_file"] else None
        kube_ca_file = Path(raw["kube_ca_file"]) if raw["kube_ca_file"] else None
        if kube_api is not None:
            if source != "kubernetes":
                raise fail(
                    "kube_api", "only applies with --source kubernetes", "add --source kubernetes"
                )
            if not kube_api.startswith(("http://", "https://")):
                raise fail("kube_api", f"{kube_api!r} is not a URL", "e.g. https://10.0.0.1:6443")
            if kube_token_file is None or not kube_token_file.is_file():
                raise fail(
                    "kube_token_file",
                    f"{kube_token_file or 'no file'} is not a readable token file",
                    "pass --kube-token-file with a bearer token for the API server",
                )
        return cls(
            kube_api=kube_api,
            kube_token_file=kube_token_file,
            kube_ca_file=kube_ca_file,
            source=source,
            registry=registry,
            state_dir=Path(raw["state_dir"] or str(DEFAULT_STATE_DIR)),
            listen=listen,
            join_listen=join_listen,
            trust_domain=trust_domain,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            node_cert_ttl=duration("node_cert_ttl"),
            serving_cert_ttl=duration("serving_cert_ttl"),
            ca_cert=ca_cert,
            ca_key=ca_key,
            ca_chain=ca_chain,
            registry_poll=poll,
            registry_settle=settle,
            registry_hold=hold,
        )
