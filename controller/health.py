"""The controller's HTTP health endpoint: is it serving, and if not, why.

A deliberately small aiohttp server, on loopback by default (``--health-addr``,
default ``127.0.0.1:15014``), with two paths:

* ``GET /healthz/live``: 200 while the process runs its event loop;
* ``GET /version``: ``{"component": "controller", "version": ...}`` (also the
  ``version`` field of the ready document), for ``veil --version`` and
  ``veilctl --version``;
* ``GET /healthz/ready``: 200 when the gRPC listeners serve and every *required*
  check passes, 503 otherwise; the JSON body always carries the phase
  (``starting``, ``syncing``, ``serving``, ``stopping``), a detail line and each
  check (in Kubernetes mode: one per watched kind, with the cause of a failure).
  A failed optional check keeps the controller ready but ``degraded``.

``veil controller status`` reads the same document. With a
:class:`controller.metrics.ControllerMetrics`, the same server also answers
``GET /metrics`` (Prometheus text format): one port for the kubelet's probes
and for scraping, as the Deployment declares it.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from controller.api.ports import CONTROLLER_HEALTH_PORT
from controller.config import ConfigError, ListenAddress
from controller.metrics import CONTENT_TYPE, ControllerMetrics

__all__ = [
    "DEFAULT_HEALTH_PORT",
    "HealthCheck",
    "HealthServer",
    "HealthState",
    "controller_version",
    "fetch_health",
]

log = logging.getLogger("veil.controller")

DEFAULT_HEALTH_PORT = CONTROLLER_HEALTH_PORT


def controller_version() -> str:
    try:
        return importlib.metadata.version("veil-mesh")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    name: str
    ok: bool
    required: bool
    state: str
    detail: str = ""
    hint: str = ""


class HealthState:
    """What the endpoint reports; the startup code moves the phase along."""

    def __init__(self) -> None:
        self.phase = "starting"
        self.detail = "connecting"
        self.checks: Callable[[], Sequence[HealthCheck]] = list

    def set_phase(self, phase: str, detail: str = "") -> None:
        self.phase, self.detail = phase, detail

    def report(self) -> dict[str, Any]:
        checks = list(self.checks())
        required_ok = all(c.ok for c in checks if c.required)
        return {
            "ready": self.phase == "serving" and required_ok,
            "degraded": any(not c.ok for c in checks if not c.required),
            "phase": self.phase,
            "detail": self.detail,
            "checks": [asdict(c) for c in checks],
            "version": controller_version(),
        }


class HealthServer:
    def __init__(self, state: HealthState, metrics: ControllerMetrics | None = None) -> None:
        self._state = state
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _ready(self, _request: web.Request) -> web.Response:
        report = self._state.report()
        return web.json_response(report, status=200 if report["ready"] else 503)

    async def _live(self, _request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def _version(self, _request: web.Request) -> web.Response:
        return web.json_response({"component": "controller", "version": controller_version()})

    async def _scrape(self, _request: web.Request) -> web.Response:
        assert self._metrics is not None
        # Collected on the event loop: the registry and the hub belong to it,
        # and every collector only reads in-memory state.
        body = self._metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def start(self, addr: ListenAddress) -> None:
        app = web.Application()
        app.router.add_get("/healthz/ready", self._ready)
        app.router.add_get("/healthz/live", self._live)
        app.router.add_get("/version", self._version)
        if self._metrics is not None:
            app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, addr.host, addr.port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(
                f"cannot listen on {addr} (health endpoint): {e.strerror or e}",
                hint="pick another address with --health-addr (VEIL_HEALTH_ADDR)",
            ) from None
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else addr.port
        log.info("health endpoint on http://%s/healthz/ready", ListenAddress(addr.host, self.port))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def fetch_health(addr: ListenAddress, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """GET /healthz/ready: (HTTP status, document). Raises OSError when unreachable."""
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    url = f"http://{host}:{addr.port}/healthz/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        doc = json.loads(body)
    except ValueError:
        raise OSError(f"{url} did not answer a health document") from None
    if not isinstance(doc, dict):
        raise OSError(f"{url} did not answer a health document")
    return status, doc
