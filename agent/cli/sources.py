"""Where veilctl reads from: the agent's status socket and the ztunnel admin API.

Maps "cannot reach" into :class:`Unreachable` (exit 3) and keeps every other
answer (an HTTP error with its message) a plain :class:`VeilError` (exit 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from agent.status.client import Endpoint, StatusClient, StatusUnavailable, ztunnel_endpoint
from veil.errors import VeilError

__all__ = ["Sources", "Unreachable"]


class Unreachable(VeilError):
    """A component (agent or ztunnel) did not answer."""

    def __init__(self, component: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.component = component


class Sources:
    """The agent and ztunnel endpoints of this node."""

    def __init__(self, agent_socket: str, ztunnel_admin: str) -> None:
        self.agent_socket = agent_socket
        host, _, port = ztunnel_admin.rpartition(":")
        if not host or not port.isdigit():
            raise VeilError(
                f"--ztunnel-admin {ztunnel_admin!r} is not HOST:PORT",
                hint="e.g. 127.0.0.1:15000",
            )
        self.zt_host, self.zt_port = host.strip("[]"), int(port)
        self._endpoints: dict[str, Endpoint] = {
            "agent": StatusClient(agent_socket),
            "ztunnel": ztunnel_endpoint(self.zt_host, self.zt_port),
        }

    @staticmethod
    def _classify(component: str, exc: StatusUnavailable) -> VeilError:
        # One exception class for both; only "cannot reach" means down.
        if exc.message.startswith("cannot reach"):
            return Unreachable(component, exc.message, hint=exc.hint)
        return exc

    def get(self, component: str, path: str) -> Any:
        try:
            return self._endpoints[component].get(path)
        except StatusUnavailable as exc:
            raise self._classify(component, exc) from None

    def post(self, component: str, path: str, body: Mapping[str, Any]) -> Any:
        try:
            return self._endpoints[component].post(path, body)
        except StatusUnavailable as exc:
            raise self._classify(component, exc) from None

    def stream(
        self, component: str, path: str, idle_timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        try:
            yield from self._endpoints[component].stream(path, idle_timeout)
        except StatusUnavailable as exc:
            raise self._classify(component, exc) from None

    def agent(self, path: str) -> Any:
        return self.get("agent", path)

    def ztunnel(self, path: str = "/config_dump") -> Any:
        return self.get("ztunnel", path)
