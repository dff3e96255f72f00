"""The supervisor of a multi-core ztunnel (``veil ztunnel run --workers N``, N > 1).

One process talks to the controller; N worker processes carry the traffic.
The supervisor owns:

- the controller channel, the Discovery watch and the state store, and
  forwards every applied update to every worker (a newly started worker
  first gets the whole current state as one snapshot);
- the :class:`~ztunnel.identity.CertManager`: one certificate request per
  identity for the whole node, whatever N is, pushed with its key to every
  worker over that worker's socketpair (keys never touch disk);
- the admin, metrics and readiness endpoints, answering from its own state
  and from its workers (connections and metrics are collected on request and
  merged; counters of exited workers are kept so sums never go backwards);
- the workers themselves: each is ``python -m ztunnel.workers.process``; a
  worker that exits unexpectedly is started again after a bounded backoff
  (:class:`~ztunnel.workers.supervision.RestartPolicy`) while the others keep
  serving, since they all bind the listeners with SO_REUSEPORT.

On SIGTERM every worker is told to drain (listeners close at once, live
connections get the grace period) and the supervisor waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from controller.api.model import TrustBundle, WatchUpdate
from controller.api.spiffe import SpiffeId
from node import NodeCredentials
from node.bootstrap import connect_node, watch_controller
from node.dataplane import MARK_ZTUNNEL
from node.lifecycle import run_until_signalled

from ..admin import OpsServer, Readiness, register_state_gauges
from ..admin.denies import DenyFeed
from ..admin.health_socket import HealthSocket
from ..config import ZtunnelConfig
from ..errors import ConfigError
from ..identity import CertManager
from ..metrics import Registry
from ..metrics.aggregate import MetricsMerger, export_registry, parse_export
from .codec import (
    Frame,
    Hello,
    IpcError,
    Kind,
    encode_certificate,
    encode_hello,
    encode_json,
    encode_state,
    parse_json,
)
from .link import FrameLink
from .slots import ForwardingStore, WorkerHandle
from .supervision import RestartPolicy

__all__ = ["Supervisor", "WorkerHandle", "run_supervised"]

log = logging.getLogger("veil.ztunnel.supervisor")

_CREDENTIALS_POLL = 30.0
# Certificates are pushed when they change; this is how often "changed" is
# checked (rotation happens at half-life, hours ahead of expiry).
_CERT_SYNC_INTERVAL = 0.5
# Workers' counters are collected this often even without a scrape, so a
# crashed worker loses at most this much of its counts.
_METRICS_POLL = 5.0
_QUERY_TIMEOUT = 2.0
_ROOT = Path(__file__).resolve().parents[2]


class Supervisor:
    """Runs N workers for one node; same constructor options as
    :class:`ztunnel.app.Ztunnel` plus the worker count."""

    def __init__(
        self,
        config: ZtunnelConfig,
        workers: int,
        *,
        credentials: NodeCredentials | None = None,
        transparent: bool = True,
        mark: int | None = MARK_ZTUNNEL,
        peer_hbone_port: int | None = None,
        restart: RestartPolicy | None = None,
    ) -> None:
        self.config = config
        self._controller = connect_node(
            config.state_dir,
            config.node_name,
            address=config.controller_address,
            credentials=credentials,
        )
        creds = self._controller.creds
        self.store = ForwardingStore(config.node_name, creds.trust_domain, self._forward)
        self.certs = CertManager(
            self._controller, self.trust_bundle, **config.cert_manager_options()
        )
        self.watch = watch_controller(self._controller, self.store, config.watch_backoff())
        self._options = (transparent, mark, peer_hbone_port)
        self._restart = restart if restart is not None else RestartPolicy()
        self.registry = Registry()
        self._merger = MetricsMerger(config.metrics_max_label_sets)
        self._restarts = self.registry.counter(
            "veil_ztunnel_worker_restarts_total",
            "Worker processes started again after they exited unexpectedly.",
        )
        self.registry.gauge(
            "veil_ztunnel_workers",
            "Worker processes: configured, and serving now.",
            ("state",),
            lambda: {
                ("configured",): float(len(self.workers)),
                ("serving",): float(sum(1 for w in self.workers if w.ready)),
            },
        )
        # The workers' denies, for /denies and `veilctl monitor`.
        self.denies = DenyFeed()
        self.readiness = Readiness(self.store, self.certs)
        self.readiness.add_check("workers", self._workers_ready)
        self.ops = OpsServer.from_config(
            config,
            store=self.store,
            registry=self.registry,
            readiness=self.readiness,
            certs=self.certs,
            watch_status=self.watch.status,
            denies=self.denies,
            gather_connections=self.gather_connections,
            render_metrics=self.render_metrics,
        )
        register_state_gauges(
            self.registry, self.store, self.certs, self.watch.status, self._controller
        )
        # This instance's own readiness (see ztunnel.admin.health_socket).
        self.health = (
            HealthSocket(config.health_socket, self.readiness) if config.health_socket else None
        )
        self.workers = [WorkerHandle(i) for i in range(workers)]
        self.stopping = False  # no restarts, no new work
        self.unready = False  # set once every worker stopped listening
        self._stopped = False
        self._query_ids = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: list[Callable[[], None]] = []
        self._reserved: list[socket.socket] = []

    # -- wiring ------------------------------------------------------------------

    def trust_bundle(self) -> TrustBundle:
        bundle = self.store.current.trust_bundle
        return bundle if bundle is not None else self._controller.creds.trust_bundle()

    def _spawn_task(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forward(self, update: WatchUpdate) -> None:
        frame = encode_state(update)
        for w in self.workers:
            if w.link is not None:
                w.link.send(frame)

    def _workers_ready(self) -> str | None:
        if self.unready:
            return "draining for shutdown"
        serving = sum(1 for w in self.workers if w.ready)
        if serving == 0:
            return f"no worker is serving yet (0 of {len(self.workers)})"
        return None

    def address(self, listener: str) -> tuple[str, int]:
        """Where a listener (outbound, inbound_plaintext, hbone) is bound."""
        c = self.config
        port = {
            "outbound": c.outbound_port,
            "inbound_plaintext": c.inbound_plaintext_port,
            "hbone": c.hbone_port,
        }[listener]
        return c.listen_address, port

    # -- lifecycle ---------------------------------------------------------------

    async def start(
        self, *, sync_timeout: float | None = None, ready_timeout: float = 60.0
    ) -> None:
        """Starts everything; returns once every worker accepts."""
        self._unsubscribe.append(self.store.subscribe(self.certs.on_state_change))
        self._unsubscribe.append(self._controller.on_reconnect(self.certs.on_reconnect))
        self._spawn_task(self.watch.run(), "veil-watch")
        self._spawn_task(self._controller.follow_credentials(_CREDENTIALS_POLL), "veil-creds")
        await self.ops.start()
        if self.health is not None:
            await self.health.start()
        log.info(
            "ztunnel for node %s with %d workers: waiting for the controller's first "
            "snapshot from %s",
            self.config.node_name,
            len(self.workers),
            self._controller.address,
        )
        try:
            await self.store.wait_synced(sync_timeout)
        except TimeoutError:
            raise ConfigError(
                f"no state from the controller at {self._controller.address} "
                f"within {sync_timeout:g}s",
                hint="check that the controller runs and this node joined it",
            ) from None
        self._reserve_ports()
        for w in self.workers:
            await self._start_worker(w)
        self._spawn_task(self._cert_sync_loop(), "veil-cert-push")
        self._spawn_task(self._metrics_loop(), "veil-metrics-poll")
        await self._wait_all_ready(ready_timeout)

    async def _wait_all_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for w in self.workers:
            ready = asyncio.ensure_future(w.became_ready.wait())
            exited = asyncio.ensure_future(w.exited.wait())
            try:
                await asyncio.wait(
                    {ready, exited},
                    timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                ready.cancel()
                exited.cancel()
            if not w.ready:
                code = w.process.returncode if w.process is not None else None
                raise ConfigError(
                    f"ztunnel worker {w.index} did not start serving"
                    + (f" (it exited with code {code})" if code is not None else ""),
                    hint=f"its log lines (marked [w{w.index}]) above say why, e.g. a "
                    "listener port in use",
                )

    def _reserve_ports(self) -> None:
        """Gives port-0 listeners (tests) one concrete port shared by all workers.

        Each worker binding port 0 would get a port of its own; instead a
        bound, never-listening SO_REUSEPORT socket holds a port the workers
        then join.
        """
        c = self.config
        chosen: dict[str, Any] = {}
        for name in ("outbound_port", "inbound_plaintext_port", "hbone_port"):
            if getattr(c, name) != 0:
                continue
            family = socket.AF_INET6 if ":" in c.listen_address else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((c.listen_address, 0))
            self._reserved.append(s)
            chosen[name] = int(s.getsockname()[1])
        if chosen:
            self.config = replace(c, **chosen)

    async def _start_worker(self, w: WorkerHandle) -> None:
        mine, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ztunnel.workers.process",
                "--fd",
                str(theirs.fileno()),
                "--index",
                str(w.index),
                "--log-level",
                self.config.log_level,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        link = await FrameLink.open(mine)
        w.process, w.link, w.pid = proc, link, proc.pid
        w.ready, w.ports, w.sent = False, {}, {}
        w.became_ready.clear()
        w.exited.clear()
        w.started_at = time.monotonic()
        transparent, mark, peer_port = self._options
        link.send(
            encode_hello(
                Hello(
                    index=w.index,
                    config=self.config,
                    join_bundle=self._controller.creds.trust_bundle(),
                    transparent=transparent,
                    mark=mark,
                    peer_hbone_port=peer_port,
                )
            )
        )
        full = self.store.full_update()
        if full is not None:
            link.send(encode_state(full))
        self._push_certs(w)
        log.info("worker %d started (pid %d)", w.index, w.pid)
        self._spawn_task(self._read(w, link), f"veil-worker-{w.index}-read")
        self._spawn_task(self._watch_exit(w, proc), f"veil-worker-{w.index}-exit")

    async def _read(self, w: WorkerHandle, link: FrameLink) -> None:
        try:
            async for frame in link.frames():
                self._on_frame(w, frame)
        except (IpcError, ValueError, TypeError, AttributeError) as e:
            log.error(
                "worker %d (pid %d) sent a malformed message (%s); restarting it",
                w.index,
                w.pid,
                e,
            )
            if w.process is not None and w.process.returncode is None:
                w.process.kill()

    def _on_frame(self, w: WorkerHandle, frame: Frame) -> None:
        body = parse_json(frame)
        if frame.kind is Kind.READY:
            ports = body.get("ports")
            w.ports = {str(k): int(v) for k, v in ports.items()} if isinstance(ports, dict) else {}
            w.ready = not self.stopping
            w.became_ready.set()
            log.info("worker %d (pid %d) serving on %s", w.index, w.pid, w.ports)
        elif frame.kind is Kind.CERT_WANTED:
            ident = body.get("identity")
            if not isinstance(ident, str):
                raise IpcError("CERT_WANTED without an identity")
            try:
                identity = SpiffeId.parse(ident)
            except ValueError as e:
                raise IpcError(f"CERT_WANTED: {e}") from None
            self._spawn_task(self._fetch_for(w, identity), f"veil-cert-for-worker-{w.index}")
        elif frame.kind is Kind.ANSWER:
            qid = body.get("id")
            fut = w.pending.pop(qid, None) if isinstance(qid, int) else None
            if fut is not None and not fut.done():
                fut.set_result(body.get("body"))
        elif frame.kind is Kind.DENY:
            if body.get("type") != "deny":
                raise IpcError("DENY frame without a deny event")
            self.denies.publish_event(body)
        else:
            raise IpcError(f"the supervisor does not accept {frame.kind.name} frames")

    async def _fetch_for(self, w: WorkerHandle, identity: SpiffeId) -> None:
        try:
            await self.certs.fetch(identity, timeout=self.config.connect_timeout)
        except Exception as e:
            if w.link is not None:
                w.link.send(
                    encode_json(
                        Kind.CERT_REFUSED,
                        {"identity": str(identity), "error": getattr(e, "message", str(e))},
                    )
                )
            return
        self._push_all_certs()

    async def _watch_exit(self, w: WorkerHandle, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        w.ready = False
        w.exited.set()
        if w.link is not None:
            w.link.close()
            w.link = None
        for fut in w.pending.values():
            if not fut.done():
                fut.cancel()
        w.pending.clear()
        self._merger.retire(w.last_metrics)
        w.last_metrics = []
        if self.stopping:
            log.info("worker %d (pid %d) exited with code %s", w.index, w.pid, code)
            return
        uptime = time.monotonic() - w.started_at
        w.crash_streak = self._restart.next_streak(w.crash_streak, uptime)
        delay = self._restart.delay(w.crash_streak)
        others = sum(1 for x in self.workers if x.ready)
        log.warning(
            "worker %d (pid %d) exited unexpectedly with code %s after %.1fs; restarting it "
            "in %.1fs (%d other worker(s) keep serving)",
            w.index,
            w.pid,
            code,
            uptime,
            delay,
            others,
        )
        await asyncio.sleep(delay)
        if self.stopping:
            return
        w.restarts += 1
        self._restarts.inc()
        try:
            await self._start_worker(w)
        except OSError as e:
            log.error("could not start worker %d again: %s", w.index, e)

    # -- certificates ------------------------------------------------------------

    def _valid_certs(self) -> dict[SpiffeId, Any]:
        out = {}
        for ident in self.certs.tracked():
            cert = self.certs.get(ident)
            if cert is not None:
                out[ident] = cert
        return out

    def _push_certs(self, w: WorkerHandle, valid: Mapping[SpiffeId, Any] | None = None) -> None:
        if w.link is None:
            return
        certs = self._valid_certs() if valid is None else valid
        for ident, cert in certs.items():
            if w.sent.get(ident) != cert.serial:
                w.link.send(encode_certificate(cert))
                w.sent[ident] = cert.serial
        for ident in set(w.sent) - set(certs):
            w.link.send(encode_json(Kind.CERT_DROP, {"identity": str(ident)}))
            del w.sent[ident]

    def _push_all_certs(self) -> None:
        valid = self._valid_certs()
        for w in self.workers:
            self._push_certs(w, valid)

    async def _cert_sync_loop(self) -> None:
        while not self.stopping:
            self._push_all_certs()
            await asyncio.sleep(_CERT_SYNC_INTERVAL)

    # -- queries (admin API) -----------------------------------------------------

    async def query(self, w: WorkerHandle, what: str, timeout: float = _QUERY_TIMEOUT) -> object:
        """Asks one worker; raises TimeoutError, or CancelledError if it exits."""
        if w.link is None:
            raise ConnectionError(f"worker {w.index} is not running")
        self._query_ids += 1
        qid = self._query_ids
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        w.pending[qid] = fut
        w.link.send(encode_json(Kind.QUERY, {"id": qid, "what": what}))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            w.pending.pop(qid, None)

    async def _ask_all(self, what: str) -> list[tuple[WorkerHandle, object]]:
        live = [w for w in self.workers if w.ready]

        async def one(w: WorkerHandle) -> tuple[WorkerHandle, object]:
            try:
                return w, await self.query(w, what)
            except (TimeoutError, ConnectionError, asyncio.CancelledError):
                log.warning("worker %d (pid %d) did not answer a %s query", w.index, w.pid, what)
                return w, None

        return list(await asyncio.gather(*(one(w) for w in live)))

    async def gather_connections(self) -> Sequence[Mapping[str, Any]]:
        """Every worker's live connections, each marked with the worker's pid."""
        out: list[dict[str, Any]] = []
        for w, answer in await self._ask_all("connections"):
            if isinstance(answer, list):
                out.extend({**c, "worker": w.pid} for c in answer if isinstance(c, dict))
        return out

    async def _collect_metrics(self) -> None:
        for w, answer in await self._ask_all("metrics"):
            if answer is None:
                continue
            try:
                w.last_metrics = parse_export(answer)
            except ValueError as e:
                log.warning("worker %d sent unusable metrics (%s)", w.index, e)

    async def render_metrics(self) -> str:
        """The supervisor's metrics and every worker's, summed."""
        await self._collect_metrics()
        exports = [export_registry(self.registry)]
        exports.extend(w.last_metrics for w in self.workers if w.last_metrics)
        return self._merger.render(exports, self.registry)

    async def _metrics_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(_METRICS_POLL)
            with contextlib.suppress(Exception):
                await self._collect_metrics()

    # -- shutdown ----------------------------------------------------------------

    async def shutdown(self, grace: float | None = None) -> None:
        """Tells every worker to drain, waits for them, stops. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping = True
        grace = self.config.drain_grace_period if grace is None else grace
        told = []
        for w in self.workers:
            if w.link is not None:
                w.link.send(encode_json(Kind.DRAIN, {"grace": grace}))
                await w.link.flush()
                told.append(w)
        # Not ready only once every worker closed its listeners (frames are
        # handled in order, so the answer to this query comes after the
        # DRAIN): a probe that sees "not ready" finds no listener either.
        await asyncio.gather(*(self.query(w, "draining") for w in told), return_exceptions=True)
        self.unready = True  # readiness follows this: only now
        for w in self.workers:
            w.ready = False
        await self.ops.close_readiness()
        live = [w.process for w in self.workers if w.process is not None]
        log.info("shutting down: %d worker(s) draining for up to %.0fs", len(live), grace)
        waits = [asyncio.ensure_future(p.wait()) for p in live]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=grace + 10.0)
            for p in live:
                if p.returncode is None:
                    log.warning("worker pid %d did not stop after draining; killing it", p.pid)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for w in self.workers:
            if w.link is not None:
                w.link.close()
                w.link = None
        for s in self._reserved:
            s.close()
        await self.certs.close()
        await self.ops.stop()
        if self.health is not None:
            await self.health.stop()
        await self._controller.close()
        log.info("ztunnel stopped")


async def run_supervised(config: ZtunnelConfig, workers: int) -> int:
    """Runs ``workers`` workers until SIGTERM or SIGINT, then drains them."""
    return await run_until_signalled(lambda: Supervisor(config, workers))
