"""The controller process: CA, registry, Discovery hub and the gRPC listeners.

:class:`Controller` wires them; :mod:`controller.run` is the process around
it (``veil controller run``: flags, health endpoint, signals). One
``grpc.aio`` server listens twice:

* the main listener (default ``:15012``) requires mutual TLS: the client must
  present a node certificate chaining to the trust bundle. It serves
  Identity.CreateCertificate and Discovery.Watch.
* the join listener (default ``:15013``) is server-TLS only, for
  Identity.JoinNode with a join token. It is separate because gRPC Python with
  ``require_client_auth=False`` does not even request a client certificate, so
  one port cannot serve both token joins and mTLS.

Both use dynamic credentials: when the CA rotates (``veil controller ca
rotate`` in another process, noticed by ``ca.watch_state_dir``) the served roots
and serving certificate change for new handshakes without a restart, and the
Discovery hub sends the new trust bundle down every watch stream. The standard
``grpc.health.v1`` service reports SERVING while a valid registry is served
(an invalid registry edit keeps the previous one in service) and NOT_SERVING
while shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import psutil
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controller.api.model import RegistryState, TrustBundle
from controller.auth import JoinTokenStore, NodeAuthenticator
from controller.ca import CertificateAuthority
from controller.config import (
    ConfigError,
    ControllerConfig,
    ListenAddress,
)
from controller.discovery import DiscoveryHub
from controller.identity import IdentityService
from controller.metrics import ControllerMetrics, ControllerSnapshot, KindAvailability
from controller.registry import RegistryFileWatcher, RegistryHolder, describe_state
from controller.service import add_services

if TYPE_CHECKING:
    from controller.k8s import KubernetesRuntime

__all__ = [
    "SERVING_DNS_NAMES",
    "Controller",
    "ServingCredentials",
    "StartupInfo",
    "serving_ips",
]

log = logging.getLogger("veil.controller")

# Nodes verify "veil-controller" (ssl_target_name_override); the in-cluster
# Service name and localhost are there for other clients and tools.
SERVING_DNS_NAMES = ("veil-controller", "veil-controller.veil-system.svc", "localhost")
HEALTH_SERVICES = ("", "veil.v1.Identity", "veil.v1.Discovery")

_SERVER_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default: a second controller started by mistake
    # would silently share the port and take half of the nodes. Fail instead.
    ("grpc.so_reuseport", 0),
    # Nodes ping every 30 s on otherwise idle watch streams; allow it, or the
    # server would answer with GOAWAY (too_many_pings) and drop the watch.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Our own pings find nodes that vanished without closing, so their
    # watchers are released instead of accumulating.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # A client that opens TCP and never finishes TLS is dropped after this.
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]
_STOP_GRACE_SECONDS = 1.0
_RENEW_CHECK_SECONDS = 60.0


def serving_ips(addresses: Iterable[ListenAddress]) -> list[str]:
    """IP SANs for the serving certificate: the listen IPs, or every local IP for 0.0.0.0/::."""
    ips: list[str] = []

    def add(ip: str) -> None:
        if ip not in ips:
            ips.append(ip)

    for addr in addresses:
        if not addr.unspecified:
            add(addr.host)
            continue
        add("127.0.0.1")
        for entries in psutil.net_if_addrs().values():
            for entry in entries:
                try:
                    ip = ipaddress.ip_address(entry.address.split("%")[0])
                except ValueError:
                    continue  # MAC addresses and the like
                if not ip.is_link_local:
                    add(str(ip))
    return ips


class ServingCredentials:
    """The controller's TLS identity for both listeners, renewed without a restart.

    gRPC calls each listener's fetcher on a core thread at every handshake; a
    fetcher returns a new configuration only when ours has changed since it
    last looked, so the common path is a lock and an integer compare.
    """

    def __init__(
        self, ca: CertificateAuthority, dns_names: Iterable[str], ips: Iterable[str], ttl: timedelta
    ) -> None:
        self._ca = ca
        self._dns = list(dns_names)
        self._ips = list(ips)
        self._ttl = ttl
        self._lock = threading.Lock()
        self._generation = 0
        self._key = b""
        self._chain = b""
        self._roots = b""
        self._not_before = datetime.now(UTC)
        self._not_after = self._not_before
        self.refresh()

    @property
    def not_after(self) -> datetime:
        return self._not_after

    def refresh(self) -> None:
        """Issues a new serving certificate and picks up the current trust bundle."""
        key, chain = self._ca.issue_serving_certificate(self._dns, self._ips, self._ttl)
        leaf = x509.load_pem_x509_certificate(chain)
        roots = b"".join(self._ca.trust_bundle().roots)
        with self._lock:
            self._key, self._chain, self._roots = key, chain, roots
            self._not_before, self._not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
            self._generation += 1
        log.info("serving certificate issued; valid until %s", self._not_after.isoformat())

    def needs_renewal(self, now: datetime) -> bool:
        """True past half of the certificate's lifetime."""
        return now >= self._not_before + (self._not_after - self._not_before) / 2

    def _config(self, client_auth: bool) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self._key, self._chain)], root_certificates=self._roots if client_auth else None
        )

    def credentials(self, *, client_auth: bool) -> grpc.ServerCredentials:
        """Server credentials that follow :meth:`refresh`; mTLS when ``client_auth``."""
        with self._lock:
            seen = [self._generation]
            initial = self._config(client_auth)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with self._lock:
                if seen[0] == self._generation:
                    return None
                seen[0] = self._generation
                return self._config(client_auth)

        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=client_auth
        )


@dataclass(frozen=True, slots=True)
class StartupInfo:
    """What :meth:`Controller.start` bound and loaded; printed as the startup line."""

    listen: str
    join_listen: str
    trust_domain: str
    ca_fingerprint: str
    registry: str
    registry_summary: str

    def line(self) -> str:
        return (
            f"veil controller serving: mTLS {self.listen}, join {self.join_listen}, "
            f"trust domain {self.trust_domain}, CA sha256:{self.ca_fingerprint}, "
            f"registry {self.registry}: {self.registry_summary}"
        )


def _bound(addr: ListenAddress, port: int) -> str:
    return str(ListenAddress(addr.host, port))


class Controller:
    """The wired controller. ``start()`` binds and serves; ``stop()`` shuts down cleanly."""

    def __init__(
        self,
        config: ControllerConfig,
        k8s: KubernetesRuntime | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.config = config
        self.k8s = k8s
        self.metrics = metrics
        if k8s is not None:
            self.ca = k8s.ca
            self.registry = k8s.holder
        else:
            self.ca = CertificateAuthority.load_or_create(
                config.state_dir,
                config.trust_domain,
                ca_cert=config.ca_cert,
                ca_key=config.ca_key,
                ca_chain=config.ca_chain,
            )
            self.registry = RegistryHolder(trust_domain=self.ca.trust_domain)
        self.watcher: RegistryFileWatcher | None = None
        if config.registry is not None:
            self.watcher = RegistryFileWatcher(
                config.registry,
                self.registry,
                interval=config.registry_poll,
                settle=config.registry_settle,
                hold=config.registry_hold,
            )
            # No previous state to fall back on: an invalid file stops the start.
            self.watcher.load_initial()
        self.hub = DiscoveryHub()
        self.hub.set_trust_bundle(self.ca.trust_bundle())
        self.hub.publish(self.registry.current())
        self.registry.subscribe(self._publish)
        self.tokens = JoinTokenStore(config.state_dir, ca_fingerprint=lambda: self.ca.fingerprint)
        authenticator: NodeAuthenticator = k8s.authenticator if k8s is not None else self.tokens
        self.identity = IdentityService(
            self.ca,
            authenticator,
            self.registry.current,
            default_ttl=config.default_ttl,
            max_ttl=config.max_ttl,
            node_cert_ttl=config.node_cert_ttl,
            recorder=metrics,
        )
        self.serving = ServingCredentials(
            self.ca,
            SERVING_DNS_NAMES,
            serving_ips((config.listen, config.join_listen)),
            config.serving_cert_ttl,
        )
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ports: tuple[int, int] = (0, 0)

    async def start(self) -> StartupInfo:
        """Binds both listeners and starts serving and the background watchers."""
        self._loop = asyncio.get_running_loop()
        if self.k8s is not None:
            # Serve nodes only once the first complete list of the cluster is published.
            self._spawn(self.k8s.run(), "kubernetes source")
            await self.k8s.wait_synced()
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        add_services(server, self.identity, self.hub)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        cfg = self.config
        ports = []
        for addr, client_auth, what in (
            (cfg.listen, True, "mTLS"),
            (cfg.join_listen, False, "join"),
        ):
            try:
                port = server.add_secure_port(
                    str(addr), self.serving.credentials(client_auth=client_auth)
                )
            except RuntimeError as e:
                port = 0
                log.debug("bind %s failed: %s", addr, e)
            if port == 0:
                raise ConfigError(
                    f"cannot listen on {addr} ({what} listener)",
                    hint="is another controller running there, or the address not on this host? "
                    "pick another with --listen / --join-listen",
                )
            ports.append(port)
        self.ports = (ports[0], ports[1])
        self.identity.mtls_address = _bound(cfg.listen, ports[0])
        await server.start()
        self._server = server
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ca.add_listener(self._bundle_changed_threadsafe)
        if self.k8s is None:  # in Kubernetes mode the runtime reloads the CA Secret
            self._spawn(self.ca.watch_state_dir(), "CA state watcher")
        self._spawn(self._renew_serving_certificate(), "serving certificate renewal")
        if self.watcher is not None:
            self._spawn(self.watcher.run(), "registry file watcher")
        return StartupInfo(
            listen=_bound(cfg.listen, ports[0]),
            join_listen=_bound(cfg.join_listen, ports[1]),
            trust_domain=self.ca.trust_domain,
            ca_fingerprint=self.ca.fingerprint,
            registry="kubernetes"
            if self.k8s is not None
            else str(cfg.registry)
            if cfg.registry is not None
            else "(none: empty)",
            registry_summary=describe_state(self.registry.current()),
        )

    def _publish(self, state: RegistryState) -> None:
        """Hands a new registry state to the hub, timed for the reload histogram."""
        if self.metrics is None:
            self.hub.publish(state)
        else:
            self.metrics.timed(lambda: self.hub.publish(state))

    def snapshot(self, phase: str, ready: bool) -> ControllerSnapshot:
        """What /metrics reports about this controller right now (event loop only)."""
        state = self.registry.current()
        status = self.registry.status()
        watchers = self.hub.watchers()
        active = [a for a in self.ca.authorities() if a.state == "active"]
        k8s = self.k8s
        kinds: tuple[KindAvailability, ...] = ()
        if k8s is not None:
            kinds = tuple(
                KindAvailability(h.kind, h.required, h.state) for h in k8s.source.health()
            )
        return ControllerSnapshot(
            phase=phase,
            ready=ready,
            source="kubernetes" if k8s is not None else "yaml",
            registry_generation=status.generation,
            registry_loaded_at=status.loaded_at,
            registry_error_at=status.last_error_at,
            registry_held=status.held is not None,
            workloads=len(state.workloads),
            services=len(state.services),
            policies=len(state.authorization_policies) + len(state.peer_authentications),
            watchers=len(watchers),
            watch_pending=sum(w.pending for w in watchers),
            discovery_version=self.hub.version,
            kinds=kinds,
            leader=k8s.elector.is_leader if k8s is not None else None,
            ca_not_after=active[0].not_after.timestamp() if active else None,
            trust_domain=self.ca.trust_domain,
        )

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s stopped unexpectedly", what)

        self._tasks.append(asyncio.create_task(guarded(), name=what))

    def _bundle_changed_threadsafe(self, bundle: TrustBundle) -> None:
        # CA listeners may run on any thread (a rotation from a worker thread);
        # the hub and the credentials are updated on the event loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._bundle_changed, bundle)

    def _bundle_changed(self, bundle: TrustBundle) -> None:
        self.hub.set_trust_bundle(bundle)
        try:
            # Sign the serving certificate with the new active root at once:
            # join tokens created from now on pin that root.
            self.serving.refresh()
        except Exception:
            log.exception("could not renew the serving certificate after a CA change")

    async def _renew_serving_certificate(self) -> None:
        while True:
            await asyncio.sleep(_RENEW_CHECK_SECONDS)
            if self.serving.needs_renewal(datetime.now(UTC)):
                try:
                    self.serving.refresh()
                except Exception:
                    # Keep serving the current certificate; retry at the next check.
                    log.exception("serving certificate renewal failed; retrying")

    async def stop(self) -> None:
        """NOT_SERVING, stop accepting, end the watch streams, stop the background tasks."""
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            await self._server.stop(_STOP_GRACE_SECONDS)
            self._server = None
        self.hub.close()
