"""A small synchronous client for the agent status socket and the ztunnel admin API.

veilctl is a short-lived CLI, so plain ``http.client`` is enough and keeps it
free of an event loop.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from veil.errors import VeilError

__all__ = ["StatusClient", "StatusUnavailable", "get_json"]


class StatusUnavailable(VeilError):
    """The agent or ztunnel could not be reached, or answered with an error."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _request(conn: http.client.HTTPConnection, path: str, what: str, hint: str) -> Any:
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise StatusUnavailable(f"cannot reach {what}: {e}", hint=hint) from None
    finally:
        conn.close()
    try:
        data = json.loads(body or b"null")
    except ValueError:
        raise StatusUnavailable(f"{what} answered {path} with non-JSON data (HTTP {resp.status})") from None
    if resp.status != 200:
        msg = data.get("error") if isinstance(data, dict) else None
        raise StatusUnavailable(f"{what} answered {path} with HTTP {resp.status}: {msg or body[:200]!r}")
    return data


def get_json(host: str, port: int, path: str, what: str, timeout: float = 5.0) -> Any:
    """GET a JSON document over TCP (the ztunnel admin API on loopback)."""
    return _request(
        http.client.HTTPConnection(host, port, timeout=timeout),
        path,
        what,
        f"is the ztunnel running on this node (admin API {host}:{port})? Run veilctl in the node's network namespace",
    )


class StatusClient:
    """Reads the agent's status API from its unix socket."""

    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def get(self, path: str) -> Any:
        return _request(
            _UnixConnection(self.socket_path, self.timeout),
            path,
            f"the agent (unix:{self.socket_path})",
            "is `veil agent run` running on this node? Pass --agent-socket if it uses another path",
        )
