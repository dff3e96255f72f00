"""The ztunnel process: wires the components together and runs them.

:class:`Ztunnel` owns the lifecycle:

1. load this node's credentials (``veil node join`` stored them) and open the
   mTLS channel to the controller;
2. start the Discovery watch into the state store, the certificate manager
   (prefetching every local workload's SVID), and the admin, metrics and
   readiness endpoints;
3. after the first snapshot, bind the 15001 / 15006 / 15008 listeners (before
   that, an enrolled pod's SYN finds no listener and is dropped: fail closed);
4. on every state change re-check the live connections this node authorized;
5. on SIGTERM: report not ready, stop accepting, GOAWAY every HBONE peer, let
   connections drain for the grace period (25 s by default), then reset what
   is left and stop.

While the controller is unreachable nothing is torn down: the last snapshot
keeps routing, certificates keep serving until they expire.

This is the whole ztunnel when it runs one worker (``--workers 1``); the
listeners and proxies themselves are :class:`~ztunnel.worker.ProxyEngine`.
With more workers, :mod:`ztunnel.workers` splits the same parts over a
supervisor (controller, certificates, admin) and N engine processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from controller.api.model import TrustBundle
from node import NodeCredentials
from node.bootstrap import connect_node, watch_controller
from node.dataplane import MARK_ZTUNNEL
from node.lifecycle import run_until_signalled
from node.state import StateStore
from ztunnel.admin import OpsServer, Readiness, register_state_gauges
from ztunnel.admin.denies import DenyFeed
from ztunnel.admin.health_socket import HealthSocket
from ztunnel.config import ZtunnelConfig
from ztunnel.errors import ConfigError
from ztunnel.identity import CertManager
from ztunnel.limits import enable_request_migration, raise_nofile_limit
from ztunnel.metrics import Registry
from ztunnel.profiling import loop_profiler
from ztunnel.worker import ProxyEngine, tune_gc

__all__ = ["Ztunnel", "run_ztunnel"]

log = logging.getLogger("veil.ztunnel")

# How often the node credentials in the state directory are checked for a
# renewed node certificate (the agent or `veil node certificate` renews it).
_CREDENTIALS_POLL = 30.0


class Ztunnel:
    """One node's ztunnel.

    ``transparent`` and ``mark`` exist for tests that run without the node's
    steering; production uses the defaults. ``peer_hbone_port`` overrides the
    HBONE port dialled on peers (tests running several ztunnels on one host).
    """

    def __init__(
        self,
        config: ZtunnelConfig,
        *,
        credentials: NodeCredentials | None = None,
        transparent: bool = True,
        mark: int | None = MARK_ZTUNNEL,
        peer_hbone_port: int | None = None,
    ) -> None:
        self.config = config
        self._controller = connect_node(
            config.state_dir,
            config.node_name,
            address=config.controller_address,
            credentials=credentials,
        )
        creds = self._controller.creds
        self.store = StateStore(config.node_name, creds.trust_domain)
        self.certs = CertManager(
            self._controller, self.trust_bundle, **config.cert_manager_options()
        )
        self.watch = watch_controller(self._controller, self.store, config.watch_backoff())
        self.metrics_registry = Registry()
        self.engine = ProxyEngine(
            config,
            store=self.store,
            certs=self.certs,
            trust_bundle=self.trust_bundle,
            registry=self.metrics_registry,
            transparent=transparent,
            mark=mark,
            peer_hbone_port=peer_hbone_port,
        )
        # The engine's parts, under the names tests and tools have always used.
        self.traffic = self.engine.traffic
        self.connections = self.engine.connections
        self.ctx = self.engine.ctx
        self.pool = self.engine.pool
        self.outbound = self.engine.outbound
        self.inbound = self.engine.inbound
        self.plaintext = self.engine.plaintext
        self.listeners = self.engine.listeners
        self.readiness = Readiness(self.store, self.certs)
        self.readiness.add_check("listeners", self.engine.listeners_ready)
        # Recent denies and the live feed behind `veilctl monitor --type deny`.
        self.denies = DenyFeed()
        self.traffic.deny_listeners.append(self.denies.publish)
        self.ops = OpsServer.from_config(
            config,
            store=self.store,
            registry=self.metrics_registry,
            readiness=self.readiness,
            certs=self.certs,
            watch_status=self.watch.status,
            connections=self.connections.dump,
            denies=self.denies,
        )
        register_state_gauges(
            self.metrics_registry, self.store, self.certs, self.watch.status, self._controller
        )
        # This instance's own readiness, unambiguous during a surge (the
        # DaemonSet's exec probes read it; :15021 may be the old pod's).
        self.health = (
            HealthSocket(config.health_socket, self.readiness) if config.health_socket else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: list[Callable[[], None]] = []
        self._stopped = False

    @property
    def draining(self) -> bool:
        return self.engine.draining

    # -- wiring ------------------------------------------------------------------

    def trust_bundle(self) -> TrustBundle:
        """The roots peers are verified against: the controller's latest, else
        the ones stored at join."""
        bundle = self.store.current.trust_bundle
        return bundle if bundle is not None else self._controller.creds.trust_bundle()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, *, sync_timeout: float | None = None) -> None:
        """Starts everything; returns once the listeners accept.

        ``sync_timeout`` bounds the wait for the controller's first snapshot
        (None: wait as long as it takes, reporting not ready meanwhile).
        """
        self._unsubscribe.append(self.store.subscribe(self.certs.on_state_change))
        self._unsubscribe.append(self._controller.on_reconnect(self.certs.on_reconnect))
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.watch.run(), name="veil-watch"))
        self._tasks.append(
            loop.create_task(
                self._controller.follow_credentials(_CREDENTIALS_POLL), name="veil-creds"
            )
        )
        await self.ops.start()
        if self.health is not None:
            await self.health.start()
        log.info(
            "ztunnel for node %s: waiting for the controller's first snapshot from %s",
            self.config.node_name,
            self._controller.address,
        )
        try:
            snap = await self.store.wait_synced(sync_timeout)
        except TimeoutError:
            raise ConfigError(
                f"no state from the controller at {self._controller.address} "
                f"within {sync_timeout:g}s",
                hint="check that the controller runs and this node joined it",
            ) from None
        log.info(
            "state synced (version %d): %d workloads, %d local",
            snap.version,
            len(snap.workloads),
            len(snap.local_workloads),
        )
        self.engine.bind_listeners()

    def address(self, listener: str) -> tuple[str, int]:
        """Where a listener (outbound, inbound_plaintext, hbone) is bound."""
        return self.engine.address(listener)

    async def shutdown(self, grace: float | None = None) -> None:
        """Drains and stops. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.drain_grace_period if grace is None else grace
        # Listeners close at once, so a surge ztunnel bound beside this one
        # (SO_REUSEPORT) receives every new connection while these drain.
        self.engine.stop_accepting()
        await self.ops.close_readiness()
        # GOAWAY to every HBONE peer (both directions) while the connections
        # that are left finish on their own.
        await self.engine.drain(grace)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.certs.close()
        await self.ops.stop()
        if self.health is not None:
            # Last: it answered "draining" to this pod's probes until now.
            await self.health.stop()
        await self._controller.close()
        log.info("ztunnel stopped")


async def run_ztunnel(config: ZtunnelConfig) -> int:
    """Runs until SIGTERM or SIGINT, then drains. Returns the exit code."""
    # Process-wide settings: the process is ours alone (not an embedding test).
    raise_nofile_limit()
    enable_request_migration()
    with loop_profiler(asyncio.get_running_loop()):  # VEIL_ZTUNNEL_PROFILE (perf work only)
        return await run_until_signalled(lambda: Ztunnel(config), on_started=tune_gc)
