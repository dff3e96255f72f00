"""A small synchronous client for the agent status socket and the ztunnel admin API.

veilctl is a short-lived CLI, so plain ``http.client`` is enough and keeps it
free of an event loop. Three verbs: GET a JSON document, POST a JSON body
(runtime changes such as log levels), and follow a stream of JSON lines
(``veilctl monitor``).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from veil.errors import VeilError

__all__ = ["Endpoint", "StatusClient", "StatusUnavailable", "get_json", "ztunnel_endpoint"]


class StatusUnavailable(VeilError):
    """The agent or ztunnel could not be reached, or answered with an error."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _decode(resp: http.client.HTTPResponse, body: bytes, path: str, what: str) -> Any:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        raise StatusUnavailable(
            f"{what} answered {path} with non-JSON data (HTTP {resp.status})"
        ) from None
    if resp.status != 200:
        msg = data.get("error") if isinstance(data, dict) else None
        hint = data.get("hint") if isinstance(data, dict) else None
        raise StatusUnavailable(
            f"{what} answered {path} with HTTP {resp.status}: {msg or body[:200]!r}",
            hint=hint if isinstance(hint, str) else None,
        )
    return data


class Endpoint:
    """One HTTP API (a unix socket or a loopback TCP address) and how to describe it."""

    def __init__(
        self,
        what: str,
        hint: str,
        *,
        unix_path: str | None = None,
        host: str = "",
        port: int = 0,
        timeout: float = 5.0,
    ) -> None:
        self.what = what
        self.hint = hint
        self.unix_path = unix_path
        self.host = host
        self.port = port
        self.timeout = timeout

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.unix_path is not None:
            return _UnixConnection(self.unix_path, timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        conn = self._connection(self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise StatusUnavailable(f"cannot reach {self.what}: {e}", hint=self.hint) from None
        finally:
            conn.close()
        return _decode(resp, raw, path, self.what)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self.request("POST", path, body)

    def stream(self, path: str, idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Follows a stream of JSON lines until the server closes it.

        ``idle_timeout`` bounds the wait for each line (None: wait forever, as
        ``veilctl monitor`` does until interrupted). Malformed lines are skipped.
        """
        conn = self._connection(self.timeout)
        try:
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise StatusUnavailable(f"cannot reach {self.what}: {e}", hint=self.hint) from None
            if resp.status != 200:
                _decode(resp, resp.read(), path, self.what)
            if conn.sock is not None:
                conn.sock.settimeout(idle_timeout)
            while True:
                try:
                    line = resp.readline()
                except TimeoutError:
                    return
                except (OSError, http.client.HTTPException) as e:
                    raise StatusUnavailable(
                        f"{self.what} closed the stream {path}: {e}", hint=self.hint
                    ) from None
                if not line:
                    return
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event
        finally:
            conn.close()


def ztunnel_endpoint(host: str, port: int, timeout: float = 5.0) -> Endpoint:
    """The ztunnel admin API on loopback."""
    return Endpoint(
        "the ztunnel admin API",
        f"is the ztunnel running on this node (admin API {host}:{port})? "
        "Run veilctl in the node's network namespace",
        host=host,
        port=port,
        timeout=timeout,
    )


def get_json(host: str, port: int, path: str, what: str, timeout: float = 5.0) -> Any:
    """GET a JSON document over TCP (the ztunnel admin API on loopback)."""
    endpoint = ztunnel_endpoint(host, port, timeout)
    endpoint.what = what
    return endpoint.get(path)


class StatusClient(Endpoint):
    """Reads the agent's status API from its unix socket."""

    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        super().__init__(
            f"the agent (unix:{socket_path})",
            "is `veil agent run` running on this node? Pass --agent-socket if it uses another path",
            unix_path=socket_path,
            timeout=timeout,
        )
        self.socket_path = socket_path
