"""The controller's version for ``veilctl --version`` and ``veil --version``.

The controller serves ``GET /version`` on its HTTP health endpoint (port
15014, loopback unless the controller was started with ``--health-addr``).
Where to ask, in order: an explicit ``--controller-health HOST:PORT`` (or
``VEIL_CONTROLLER_HEALTH``), else the host this node joined (its state
directory) with the default health port. Unreachable is an answer, not an
error: --version always prints what it could find.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from controller.api.ports import CONTROLLER_HEALTH_PORT
from node.credentials import load_node_credentials
from veil.errors import VeilError

__all__ = [
    "DEFAULT_NODE_STATE_DIR",
    "ControllerVersion",
    "controller_health_address",
    "fetch_controller_version",
]

DEFAULT_NODE_STATE_DIR: Final = Path("/var/lib/veil/node")
_TIMEOUT: Final = 2.0


@dataclass(frozen=True)
class ControllerVersion:
    """What was found: the version, or why there is none."""

    address: str | None
    version: str | None
    error: str | None = None


def controller_health_address(explicit: str | None, state_dir: Path) -> str | None:
    """HOST:PORT of the controller's health endpoint; None when nothing says where."""
    if explicit:
        return explicit
    try:
        creds = load_node_credentials(state_dir)
    except (VeilError, OSError):
        return None
    host = creds.controller_address.rpartition(":")[0]
    return f"{host}:{CONTROLLER_HEALTH_PORT}" if host else None


def _get(url: str, timeout: float) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def fetch_controller_version(
    explicit: str | None, state_dir: Path = DEFAULT_NODE_STATE_DIR, timeout: float = _TIMEOUT
) -> ControllerVersion:
    addr = controller_health_address(explicit, state_dir)
    if addr is None:
        return ControllerVersion(
            None,
            None,
            f"no controller address: this node has not joined ({state_dir}); "
            "pass --controller-health HOST:PORT",
        )
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        return ControllerVersion(addr, None, f"{addr!r} is not HOST:PORT")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    base = f"http://{host}:{port}"
    try:
        status, doc = _get(f"{base}/version", timeout)
        if status == 404:  # a controller older than /version: the ready document
            status, doc = _get(f"{base}/healthz/ready", timeout)
    except (OSError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", None) or e
        return ControllerVersion(addr, None, f"cannot reach {base}: {reason}")
    version = doc.get("version") if isinstance(doc, dict) else None
    if not isinstance(version, str):
        return ControllerVersion(addr, None, f"{base} answered HTTP {status} without a version")
    return ControllerVersion(addr, version)
