"""The ztunnel's operations endpoints (served by :mod:`ztunnel.admin.http`).

Three listeners, because they have different audiences:

- admin on ``127.0.0.1:15000`` (loopback only, refused otherwise): ``/config_dump``
  (workloads, services, policies, peer authentications, certificates without
  keys, live connections, controller status), ``/certs`` (``?pem=1`` adds
  each chain and the trust bundle as PEM: public material only), ``/healthz``,
  ``/healthz/ready``, ``/metrics``, ``/version``, ``/logging`` (GET the levels,
  POST ``{"level": "proxy=debug"}`` to change them at runtime) and ``/denies``
  (recent policy denies; ``?follow=1`` streams them as JSON lines);
- Prometheus on ``:15020``: ``/metrics`` (and ``/stats/prometheus``);
- readiness on ``:15021``: ``/healthz/ready`` (readiness and startup probes)
  and ``/healthz/live`` (liveness) for the kubelet.

Liveness depends on nothing but the event loop answering: a controller outage
makes the ztunnel unready (no snapshot, expired certificates) but must never
get it restarted, since a restarted ztunnel starts with neither.

Live connections belong to the proxy, so the server takes a callback for them.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from node.loglevels import LogLevelError, apply_levels, current_levels, parse_level_spec
from node.state.store import StateStore
from node.watch import WatchStatus

from ..config import ZtunnelConfig, is_loopback
from ..errors import AdminBindError
from ..identity.manager import CertManager
from ..metrics.components import (
    ControllerCounters,
    add_process_metrics,
    register_certificate_expiry,
    register_controller_metrics,
)
from ..metrics.prometheus import CONTENT_TYPE, Registry
from .denies import DenyFeed
from .dump import config_dump
from .http import Handler, HttpServer, Request, Response, json_response, text_response
from .readiness import Readiness

__all__ = ["ConnectionsProvider", "OpsServer", "register_state_gauges"]

log = logging.getLogger("veil.ztunnel.admin")

ConnectionsProvider = Callable[[], Sequence[Mapping[str, Any]]]
ConnectionsGatherer = Callable[[], Awaitable[Sequence[Mapping[str, Any]]]]
MetricsRenderer = Callable[[], Awaitable[str]]


def _json(data: object, status: int = 200) -> Response:
    return json_response(data, status)


def _version() -> str:
    try:
        return importlib.metadata.version("veil-mesh")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def register_state_gauges(
    registry: Registry,
    store: StateStore,
    certs: CertManager | None = None,
    watch_status: Callable[[], WatchStatus] | None = None,
    controller: ControllerCounters | None = None,
    *,
    process: bool = True,
) -> None:
    """Gauges about the control-plane state, read at scrape time, and (unless
    ``process`` is False) this process's own metrics and build info. Called
    once per process that serves ``/metrics``."""
    if process:
        add_process_metrics(registry)
    if controller is not None:
        register_controller_metrics(registry, controller)

    def workloads() -> dict[tuple[str, ...], float]:
        snap = store.current
        return {("all",): len(snap.workloads), ("local",): len(snap.local_workloads)}

    registry.gauge(
        "veil_ztunnel_workloads", "Workloads known to this ztunnel.", ("scope",), workloads
    )
    registry.gauge(
        "veil_ztunnel_state_version",
        "Version of the control-plane state being served.",
        (),
        lambda: {(): float(store.current.version)},
    )
    if watch_status is not None:
        registry.gauge(
            "veil_ztunnel_controller_connected",
            "1 while the Discovery watch to the controller is up.",
            (),
            lambda: {(): 1.0 if watch_status().connected else 0.0},
        )
    if certs is not None:

        def cert_states() -> dict[tuple[str, ...], float]:
            out: dict[tuple[str, ...], float] = {
                ("valid",): 0.0,
                ("pending",): 0.0,
                ("expired",): 0.0,
            }
            for s in certs.statuses():
                out[(s.state,)] = out.get((s.state,), 0.0) + 1
            return out

        registry.gauge(
            "veil_ztunnel_certificates",
            "Workload certificates held, by state.",
            ("state",),
            cert_states,
        )
        register_certificate_expiry(registry, certs.statuses)


class OpsServer:
    """Runs the admin, metrics and readiness listeners."""

    def __init__(
        self,
        *,
        store: StateStore,
        registry: Registry,
        readiness: Readiness,
        certs: CertManager | None = None,
        watch_status: Callable[[], WatchStatus] | None = None,
        connections: ConnectionsProvider | None = None,
        denies: DenyFeed | None = None,
        gather_connections: ConnectionsGatherer | None = None,
        render_metrics: MetricsRenderer | None = None,
        admin_address: tuple[str, int] = ("127.0.0.1", 15000),
        metrics_address: tuple[str, int] | None = ("0.0.0.0", 15020),
        readiness_address: tuple[str, int] | None = ("0.0.0.0", 15021),
    ) -> None:
        if not is_loopback(admin_address[0]):
            raise AdminBindError(
                f"refusing to serve the admin API on {admin_address[0]}: it is not a loopback "
                "address",
                hint="the admin API exposes workload state; bind it to 127.0.0.1 or ::1 and "
                "use the metrics (:15020) and readiness (:15021) listeners for remote access",
            )
        self._store = store
        self._registry = registry
        self._readiness = readiness
        self._certs = certs
        self._watch_status = watch_status
        self._connections = connections
        # A multi-core ztunnel's supervisor asks its workers (async) for the
        # connections and metrics; a single process reads its own.
        self._gather_connections = gather_connections
        self._render_metrics = render_metrics
        self._denies = denies if denies is not None else DenyFeed()
        self._wanted = {
            "admin": admin_address,
            "metrics": metrics_address,
            "readiness": readiness_address,
        }
        self._servers: list[HttpServer] = []
        self._by_name: dict[str, HttpServer] = {}
        self.addresses: dict[str, tuple[str, int]] = {}

    @classmethod
    def from_config(cls, config: ZtunnelConfig, **kwargs: Any) -> OpsServer:
        return cls(
            admin_address=config.admin_address,
            metrics_address=config.metrics_address,
            readiness_address=config.readiness_address,
            **kwargs,
        )

    # -- handlers ----------------------------------------------------------------

    def dump(self, gathered: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """The ``/config_dump`` document (also used by tests and the CLI).

        ``gathered``: connections already collected from the workers."""
        try:
            if gathered is not None:
                conns = [dict(c) for c in gathered]
            elif self._connections is not None:
                conns = [dict(c) for c in self._connections()]
            else:
                conns = []
        except Exception as e:
            log.exception("connections provider failed")
            conns = [{"error": f"{type(e).__name__}: {e}"}]
        return config_dump(
            self._store.current,
            certificates=self._certs.dump() if self._certs is not None else [],
            controller=self._watch_status().to_json() if self._watch_status is not None else None,
            connections=conns,
        )

    async def _config_dump(self, request: Request) -> Response:
        if self._gather_connections is not None:
            return _json(self.dump(await self._gather_connections()))
        return _json(self.dump())

    async def _certificates(self, request: Request) -> Response:
        certs = self._certs.dump() if self._certs is not None else []
        if request.query.get("pem") not in ("1", "true") or self._certs is None:
            return _json(certs)
        chains = {
            str(s.identity): [c.decode() for c in s.certificate.chain_pem]
            for s in self._certs.statuses()
            if s.certificate is not None
        }
        bundle = self._store.current.trust_bundle
        return _json(
            {
                "certificates": [
                    {**c, "chain_pem": chains.get(str(c["identity"]), [])} for c in certs
                ],
                "trust_bundle_pem": [r.decode() for r in bundle.roots] if bundle else [],
            }
        )

    async def _version(self, request: Request) -> Response:
        return _json({"component": "ztunnel", "version": _version()})

    async def _logging(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                body = json.loads(request.body or b"{}")
            except ValueError:
                return _json({"error": "the request body is not JSON"}, 400)
            spec = body.get("level") if isinstance(body, dict) else None
            if not isinstance(spec, str):
                return _json({"error": 'expected a JSON body {"level": "COMPONENT=LEVEL"}'}, 400)
            try:
                applied = apply_levels(parse_level_spec(spec), "veil.ztunnel")
            except LogLevelError as e:
                return _json({"error": e.message, "hint": e.hint}, 400)
            log.warning("log levels changed through the admin API: %s", applied)
            return _json({"applied": applied, **current_levels()})
        return _json(current_levels())

    async def _deny_list(self, request: Request) -> Response:
        if request.query.get("follow") not in ("1", "true"):
            return _json({"denies": self._denies.recent(), "total": self._denies.total})

        async def lines() -> AsyncIterator[bytes]:
            async for event in self._denies.follow():
                yield json.dumps(event, default=str).encode() + b"\n"

        return Response(200, lines(), "application/x-ndjson")

    async def _healthz(self, request: Request) -> Response:
        return text_response("ok\n")

    async def _live(self, request: Request) -> Response:
        # Answered by the event loop itself: nothing here may consult state
        # that a controller outage can take away.
        return text_response("alive\n")

    async def _ready(self, request: Request) -> Response:
        result = self._readiness.check()
        if result.ready:
            return text_response("ready\n")
        return text_response("not ready: " + "; ".join(result.reasons) + "\n", 503)

    async def _metrics(self, request: Request) -> Response:
        if self._render_metrics is not None:
            body = await self._render_metrics()
        else:
            body = self._registry.render()
        return Response(200, body.encode(), CONTENT_TYPE)

    async def _index(self, request: Request) -> Response:
        return _json(
            {
                "endpoints": [
                    "/config_dump",
                    "/certs",
                    "/healthz",
                    "/healthz/live",
                    "/healthz/ready",
                    "/metrics",
                    "/version",
                    "/logging",
                    "/denies",
                ],
                "time": datetime.now(UTC).isoformat(),
            }
        )

    def _routes(self) -> dict[str, dict[str, dict[str, Handler]]]:
        def get(handler: Handler) -> dict[str, Handler]:
            return {"GET": handler}

        admin: dict[str, dict[str, Handler]] = {
            "/": get(self._index),
            "/config_dump": get(self._config_dump),
            "/certs": get(self._certificates),
            "/healthz": get(self._healthz),
            "/healthz/live": get(self._live),
            "/healthz/ready": get(self._ready),
            "/metrics": get(self._metrics),
            "/version": get(self._version),
            "/logging": {"GET": self._logging, "POST": self._logging},
            "/denies": get(self._deny_list),
        }
        metrics = {"/metrics": get(self._metrics), "/stats/prometheus": get(self._metrics)}
        ready = {"/healthz/ready": get(self._ready), "/healthz/live": get(self._live)}
        return {"admin": admin, "metrics": metrics, "readiness": ready}

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Binds every configured listener; on failure nothing stays bound."""
        try:
            for name, routes in self._routes().items():
                addr = self._wanted[name]
                if addr is None:
                    continue
                server = HttpServer(name, routes)
                # SO_REUSEPORT: a surge ztunnel (rolling update, host network)
                # binds these ports while the old one still holds them.
                try:
                    bound = await server.start(addr[0], addr[1])
                except OSError as e:
                    raise AdminBindError(
                        f"cannot listen for {name} on {addr[0]}:{addr[1]}: {e.strerror or e}",
                        hint="another process holds the port; stop it or choose another "
                        f"--{name}-address",
                    ) from None
                self._servers.append(server)
                self._by_name[name] = server
                self.addresses[name] = bound
                log.info("%s endpoint listening on %s:%d", name, *self.addresses[name])
        except BaseException:
            await self.stop()
            raise

    async def close_readiness(self) -> None:
        """Stops answering readiness probes (draining: a surge instance sharing
        the port answers them from now on)."""
        server = self._by_name.pop("readiness", None)
        if server is not None:
            self._servers.remove(server)
            self.addresses.pop("readiness", None)
            await server.close()

    async def stop(self) -> None:
        self._denies.close()  # ends `veilctl monitor` streams, or cleanup would wait on them
        self._by_name = {}
        servers, self._servers = self._servers, []
        for server in servers:
            await server.close()
        self.addresses = {}
