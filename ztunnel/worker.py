"""The serving half of a ztunnel: listeners, proxies, HBONE pool, live connections.

:class:`ProxyEngine` is what carries traffic. It reads the state from a
:class:`~node.state.StateStore` and certificates from a
:class:`~ztunnel.identity.CertificateSource`, and never talks to the
controller itself. Two things host it:

- :class:`ztunnel.app.Ztunnel` (one process: the engine beside the controller
  channel, the watch and the certificate manager);
- a worker process of a multi-core ztunnel (:mod:`ztunnel.workers`), whose
  store and certificates are fed by the supervisor over a local socket.

Every engine binds its listeners with SO_REUSEPORT, so N engines in N
processes form one reuseport group per port and the kernel spreads new
connections across them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from collections.abc import Callable

from controller.api.model import TrustBundle
from node.dataplane import MARK_ZTUNNEL
from node.state import StateChange, StateStore

from .config import SpliceMode, ZtunnelConfig
from .hbone import HboneClientPool, HboneConfig
from .identity import CertificateSource
from .metrics import Registry, TrafficMetrics
from .metrics.components import register_pool_gauges
from .proxy.connections import ConnectionRegistry, Direction
from .proxy.context import ProxyContext
from .proxy.errors import ListenerError
from .proxy.inbound import InboundProxy
from .proxy.listener import ConnectionHandler, Listener
from .proxy.outbound import OutboundProxy
from .proxy.plaintext import PlaintextProxy
from .proxy.sockets import Address, connect_upstream, listener_socket
from .proxy.splice import SameNodeSplice
from .tls import TlsContextCache

__all__ = ["LISTENER_NAMES", "ProxyEngine", "tune_gc"]

log = logging.getLogger("veil.ztunnel")

LISTENER_NAMES = ("hbone", "inbound_plaintext", "outbound")

# Young-generation collections every this many net allocations (CPython's
# default is 700). Every proxied connection allocates a few hundred objects,
# so the default runs a collection every couple of connections; a collection
# pause lands on whichever packet is being relayed (latency tail).
_GC_GEN0_THRESHOLD = 20_000


class ProxyEngine:
    """The listeners and proxies of one ztunnel process.

    ``registry`` receives the traffic counters and the active-connections
    gauge. ``transparent``, ``mark`` and ``peer_hbone_port`` exist for tests
    that run without the node's steering.
    """

    def __init__(
        self,
        config: ZtunnelConfig,
        *,
        store: StateStore,
        certs: CertificateSource,
        trust_bundle: Callable[[], TrustBundle],
        registry: Registry,
        transparent: bool = True,
        mark: int | None = MARK_ZTUNNEL,
        peer_hbone_port: int | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.traffic = TrafficMetrics(registry, max_label_sets=config.metrics_max_label_sets)
        self.connections = ConnectionRegistry()
        self.ctx = ProxyContext(
            store=store,
            metrics=self.traffic,
            registry=self.connections,
            mark=mark,
            transparent=transparent,
            connect_timeout=config.connect_timeout,
            own_ports=frozenset(
                {config.outbound_port, config.inbound_plaintext_port, config.hbone_port}
            ),
        )
        hbone_config = HboneConfig(
            pool_idle_timeout=config.pool_idle_timeout,
            handshake_timeout=config.connect_timeout,
            shutdown_grace=config.drain_grace_period,
        )
        contexts = TlsContextCache()
        self.pool = HboneClientPool(
            trust_bundle, connect=self._dial_peer, config=hbone_config, contexts=contexts
        )
        # Off: the relay carries every same-node connection (never slower for bulk).
        self.splice = (
            None
            if config.same_node_splice is SpliceMode.OFF
            else SameNodeSplice(config.pin_dir, promote=config.same_node_splice is SpliceMode.AUTO)
        )
        self.outbound = OutboundProxy(
            self.ctx, certs, self.pool, peer_hbone_port=peer_hbone_port, splice=self.splice
        )
        self.inbound = InboundProxy(
            self.ctx, certs, trust_bundle, config=hbone_config, contexts=contexts
        )
        self.plaintext = PlaintextProxy(self.ctx)
        register_pool_gauges(registry, self.pool.connections)
        registry.gauge(
            "veil_ztunnel_active_connections",
            "Connections the ztunnel is proxying now, by direction.",
            ("direction",),
            self.active_by_direction,
        )
        self.listeners: dict[str, Listener] = {}
        self.draining = False
        self._unsubscribe = store.subscribe(self._on_state_change)

    async def _dial_peer(self, ip: str, port: int) -> socket.socket:
        # Marked so the node's steering does not capture the tunnel itself.
        return await connect_upstream(
            Address(ip, port), mark=self.ctx.mark, timeout=self.config.connect_timeout
        )

    def _on_state_change(self, change: StateChange) -> None:
        if change.affects_authorization:
            self.connections.recheck(change.new)

    def active_by_direction(self) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {(d.value,): 0.0 for d in Direction}
        for c in self.connections:
            out[(c.info.direction.value,)] += 1
        return out

    def listeners_ready(self) -> str | None:
        """None when serving, else why not (a readiness check)."""
        if self.draining:
            return "draining for shutdown"
        if len(self.listeners) < len(LISTENER_NAMES):
            return "listeners not bound yet"
        return None

    def bind_listeners(self) -> None:
        """Binds 15008, 15006 and 15001 (or the configured ports) and accepts."""
        c = self.config
        host = c.listen_address
        wanted: list[tuple[str, int, ConnectionHandler]] = [
            ("hbone", c.hbone_port, self.inbound.handle),
            ("inbound_plaintext", c.inbound_plaintext_port, self.plaintext.handle),
            ("outbound", c.outbound_port, self.outbound.handle),
        ]
        transparent = self.ctx.transparent
        try:
            for name, port, handler in wanted:
                try:
                    sock = listener_socket(host, port, transparent=transparent)
                except OSError as e:
                    raise ListenerError(name, host, port, e) from None
                listener = Listener(name, sock, handler)
                self.listeners[name] = listener
                listener.start()
                log.info("%s listener on %s:%d", name, *listener.address)
            # The ports actually bound (0 in the config means "any"), for the
            # guard against connections addressed to the ztunnel itself.
            self.ctx.own_ports = frozenset(lst.address[1] for lst in self.listeners.values())
        except BaseException:
            for listener in self.listeners.values():
                listener.stop_accepting()
            self.listeners.clear()
            raise

    def address(self, listener: str) -> tuple[str, int]:
        """Where a listener (outbound, inbound_plaintext, hbone) is bound."""
        return self.listeners[listener].address

    def stop_accepting(self) -> None:
        """Closes the listeners at once, so a surge ztunnel or a sibling worker
        bound beside this one (SO_REUSEPORT) receives every new connection."""
        self.draining = True
        for listener in self.listeners.values():
            listener.stop_accepting()

    async def drain(self, grace: float) -> None:
        """GOAWAY every HBONE peer, let live connections finish for ``grace``
        seconds, then reset what is left and close the listeners."""
        self.stop_accepting()
        live = len(self.connections)
        log.info("shutting down: draining %d connection(s) for up to %.0fs", live, grace)
        await asyncio.gather(
            self.inbound.shutdown(grace),
            self.pool.shutdown(grace),
            self.connections.wait_empty(grace),
        )
        left = self.connections.close_all("shutdown: drain grace period ended")
        if left:
            log.warning("drain grace period ended; reset %d connection(s)", left)
            await self.connections.wait_empty(2.0)
        for listener in self.listeners.values():
            await listener.close(timeout=2.0)
        self._unsubscribe()


def tune_gc() -> None:
    """Move everything built at startup (modules, the first snapshot, TLS and
    gRPC state) out of the collector's reach and make young collections rarer.

    Full collections walk every tracked object; with startup objects frozen
    they only walk what the data path created, which keeps their pauses short.
    """
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GC_GEN0_THRESHOLD, gen1, gen2)
