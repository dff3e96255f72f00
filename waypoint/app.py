"""The waypoint process: wires the components together and runs them.

1. load the node credentials ``veil node join`` stored, open the controller
   channel, watch the state into a :class:`~node.state.StateStore` and derive a
   :class:`~waypoint.view.WaypointView` on every change;
2. fetch the waypoint's own certificate (``spiffe://<td>/ns/<ns>/sa/<sa>``)
   with the ztunnel's :class:`~ztunnel.identity.CertManager`, which rotates it;
3. bind the HBONE listener and the admin (loopback) and metrics endpoints;
4. for every CONNECT: refuse destinations the view does not serve, else
   answer 200 and serve HTTP/1.1 or HTTP/2 (prior knowledge) from the tunnel;
5. on SIGTERM: stop accepting, GOAWAY, drain for the grace period, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from controller.api.model import TrustBundle
from controller.api.spiffe import workload_identity
from node import NodeCredentials
from node.backoff import Backoff
from node.bootstrap import connect_node, watch_controller
from node.lifecycle import run_until_signalled
from node.state import StateChange, StateStore
from node.state.snapshot import normalize_ip
from ztunnel.hbone import HboneClientPool, HboneConfig, HboneServer, InboundStream, relay
from ztunnel.identity import CertManager
from ztunnel.metrics import Registry
from ztunnel.tls import TlsContextCache, WorkloadCredential

from .admin import AdminServer
from .config import WaypointConfig
from .decide import PeerFacts
from .errors import WaypointError
from .forward import RequestProxy, TunnelContext
from .http1 import serve_http1
from .http2 import PREFACE, serve_http2
from .jwks import JwksCache
from .metrics import RequestMetrics
from .pipe import stream_pipe
from .upstream import Upstream
from .view import WaypointView, build_view

__all__ = ["Waypoint", "run_waypoint"]

log = logging.getLogger("veil.waypoint")


class Waypoint:
    def __init__(
        self, config: WaypointConfig, *, credentials: NodeCredentials | None = None
    ) -> None:
        self.config = config
        self._controller = connect_node(
            config.state_dir,
            config.node_name,
            address=config.controller_address,
            credentials=credentials,
            hint="pass the node name the waypoint joined as (`veil node join`)",
        )
        creds = self._controller.creds
        self.store = StateStore(config.node_name, creds.trust_domain)
        self.identity = workload_identity(creds.trust_domain, config.namespace, config.sa)
        self.certs = CertManager(
            self._controller, self.trust_bundle, request_timeout=config.connect_timeout
        )
        self.watch = watch_controller(self._controller, self.store, Backoff(0.5, 30.0))
        self.view = WaypointView(config.namespace, config.name)
        hbone = HboneConfig(
            handshake_timeout=config.connect_timeout, shutdown_grace=config.drain_grace_period
        )
        contexts = TlsContextCache()
        self.pool = HboneClientPool(self.trust_bundle, config=hbone, contexts=contexts)
        # A waypoint is dialled at its own address and the CONNECT authority
        # names the destination (a Service VIP or a workload), so the ztunnel's
        # authority-is-destination rule is off; _on_stream refuses every
        # destination this waypoint does not serve.
        self.server = HboneServer(
            self._select_cert,
            self.trust_bundle,
            self._on_stream,
            config=hbone,
            contexts=contexts,
            require_authority_is_destination=False,
        )
        self.upstream = Upstream(self.pool, self._credential, hbone_port=config.peer_hbone_port)
        self.metrics = RequestMetrics(Registry(), max_label_sets=config.metrics_max_label_sets)
        self.jwks = JwksCache(refresh=config.jwks_refresh, timeout=config.connect_timeout)
        self.proxy = RequestProxy(
            lambda: self.view, self.upstream, self.metrics, self.jwks, max_body=config.max_body
        )
        self.admin = AdminServer(self)
        self.tunnels = 0
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._stopped = False

    # -- wiring ------------------------------------------------------------------

    def trust_bundle(self) -> TrustBundle:
        bundle = self.store.current.trust_bundle
        return bundle if bundle is not None else self._controller.creds.trust_bundle()

    def _credential(self) -> WorkloadCredential | None:
        return self.certs.get(self.identity)

    def _select_cert(self, _dst_ip: str) -> WorkloadCredential | None:
        return self._credential()

    def _on_state_change(self, change: StateChange) -> None:
        self.view = build_view(change.new, self.config.namespace, self.config.name, self.config.sa)
        log.info(
            "waypoint view v%d: %d service destination(s)",
            self.view.version,
            len(self.view.services),
        )

    @property
    def hbone_address(self) -> tuple[str, int]:
        assert self._listener is not None, "not started"
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    # -- tunnels -----------------------------------------------------------------

    async def _on_stream(self, stream: InboundStream) -> None:
        req = stream.request
        if self.view.resolve(req.host, req.port) is None:
            stream.reject(401, f"{req.authority} does not use waypoint {self.config.name}")
            log.info("waypoint: refused tunnel to %s: not one of ours", req.authority)
            return
        ident = req.peer_identity
        wl = ident.workload
        snap = self.store.current
        source = "unknown"
        forwarded: tuple[str, int] | None = None
        if req.forwarded_for is not None:
            ip, port = req.forwarded_for
            forwarded = (ip, port or 0)
            w = snap.workload_by_ip(ip)
            if w is not None and w.identity == ident:
                source = w.name
        ctx = TunnelContext(
            dst_ip=normalize_ip(req.host),
            dst_port=req.port,
            peer=PeerFacts(
                principal=str(ident).removeprefix("spiffe://"),
                namespace=wl[0] if wl is not None else None,
                ip=req.forwarded_for[0] if req.forwarded_for else req.peer_addr[0],
            ),
            source_workload=source,
            forwarded_for=forwarded,
        )
        self.tunnels += 1
        end, reader, writer = stream_pipe(req.authority)
        relaying = asyncio.get_running_loop().create_task(relay(stream, end))
        try:
            first = b""
            while len(first) < len(PREFACE) and PREFACE.startswith(first):
                chunk = await reader.read(64 * 1024)
                if not chunk:
                    break
                first += chunk
            if first.startswith(PREFACE):
                await serve_http2(reader, writer, ctx, self.proxy, first)
            elif first:
                await serve_http1(
                    reader, writer, ctx, self.proxy, first, idle_timeout=self.config.idle_timeout
                )
            else:
                writer.close()
        except (ConnectionError, OSError) as e:
            # The client's tunnel was reset before it sent a request: routine.
            log.debug("waypoint: tunnel from %s ended early: %s", ctx.peer.principal, e)
            writer.close()
        finally:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(relaying), 5.0)
            if not relaying.done():
                relaying.cancel()

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                if self._stopped:
                    return
                log.warning("waypoint accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self.server.serve_connection(conn))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, *, sync_timeout: float | None = 30.0) -> None:
        loop = asyncio.get_running_loop()
        self.store.subscribe(self._on_state_change)
        self._controller.on_reconnect(self.certs.on_reconnect)
        self._tasks.append(loop.create_task(self.watch.run(), name="veil-waypoint-watch"))
        try:
            snap = await self.store.wait_synced(sync_timeout)
        except TimeoutError:
            raise WaypointError(
                f"no state from the controller at {self._controller.address} within {sync_timeout}s",
                hint="check that the controller runs and this waypoint's node joined it",
            ) from None
        self.view = build_view(snap, self.config.namespace, self.config.name, self.config.sa)
        await self.certs.fetch(self.identity, timeout=sync_timeout)
        host, port = self.config.listen_address, self.config.hbone_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if host == "::":
            # One dual-stack listener: source ztunnels dial a replica in the
            # destination's address family (IPv4 peers read as ::ffff:a.b.c.d).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise WaypointError(
                f"cannot bind the waypoint's HBONE listener on {host}:{port}: {e}",
                hint="another process holds the port; pick another with --hbone-port",
            ) from None
        sock.listen(1024)
        sock.setblocking(False)
        self._listener = sock
        self._tasks.append(loop.create_task(self._accept_loop(sock), name="veil-waypoint-accept"))
        await self.admin.start()
        log.info(
            "waypoint %s/%s as %s: HBONE on %s:%d, %d service destination(s)",
            self.config.namespace,
            self.config.name,
            self.identity,
            *self.hbone_address,
            len(self.view.services),
        )

    async def shutdown(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.drain_grace_period if grace is None else grace
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # stop listening now (see ztunnel)
            self._listener.close()
        await asyncio.gather(self.server.shutdown(grace), self.pool.shutdown(grace))
        for t in [*self._tasks, *self._conn_tasks]:
            t.cancel()
        for t in [*self._tasks, *self._conn_tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.proxy.upstream_h2.close()
        await self.upstream.close()
        await self.jwks.close()
        await self.admin.stop()
        await self.certs.close()
        await self._controller.close()
        log.info("waypoint stopped")


async def run_waypoint(config: WaypointConfig) -> int:
    """Runs until SIGTERM or SIGINT, then drains. Returns the exit code."""
    return await run_until_signalled(lambda: Waypoint(config))
