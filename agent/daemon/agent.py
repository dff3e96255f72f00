"""The node agent process: load the data plane, watch the registry, keep pods enrolled.

Startup, in order (each failure is an AgentError naming the fix, never a traceback;
steps 1 to 4 are :mod:`agent.daemon.startup`):

1. node credentials from ``veil node join`` (the state dir shared with the ztunnel);
2. preflight and program loading in a child process (agent.daemon.loader), so
   this long-lived process never maps the compiler;
3. ``Dataplane.open`` on the pins the child left: same build, so nothing is
   compiled and no filter changes. Pods enrolled by a previous agent stay
   steered throughout, which is why a restart opens no window;
4. ``setup_node``: policy routing and the uplink program;
5. the status API on the unix socket, the controller watch (namespaces and
   workloads only, through :class:`~agent.daemon.identity.NodeIdentity`, which
   also renews the node certificate), and the reconcile loop.

Reconciling starts only once the registry has been received: until then the
pins keep whatever the previous agent enrolled, and nothing is removed on the
strength of an empty view. Afterwards every registry change triggers a pass
over just the workloads (and addresses) it touched, so enrolling one pod costs
the same on a node with 200; a full pass runs at start, every
``resync_interval`` (repairing drift, e.g. a filter someone detached) and on
SIGHUP. Pods whose veth is not there yet are retried with a short backoff.

SIGTERM and SIGINT stop the process and leave every program, filter, map
entry, rule and route in place: the node stays fail closed. Only
``veil agent uninstall`` removes them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import psutil
from pyroute2 import IPRoute

from agent.bpf import Dataplane, DataplaneOptions, PodDataplaneState
from agent.errors import AgentError
from agent.net.sockreset import reset_pod_tcp
from agent.status import StatusServer
from agent.status.monitor import DropMonitor
from controller.api.model import ResourceType, Workload
from node.backoff import Backoff
from node.loglevels import LogLevelError, apply_levels, current_levels, parse_level_spec
from node.state import StateChange, StateStore
from node.watch import WatchClient

from .audit import AuditInput, audit
from .config import AgentConfig
from .identity import NodeIdentity
from .loader import LoadResult, load_in_child
from .metrics import AgentMetrics, DataplaneSample, DropTotals, MetricsServer, read_sample
from .netinfo import NodeNetwork, tcp_listeners
from .reconcile import (
    AwaitVeth,
    DesiredState,
    Enroll,
    MarkLocal,
    Refresh,
    Unenroll,
    address_order,
    describe,
    desired_pods,
    plan,
    workload_addresses,
)
from .startup import another_agent_answers, node_credentials, open_dataplane
from .views import ReconcileReport, pod_rows, workload_rows

__all__ = ["AgentDaemon", "agent_version", "run_agent"]

log = logging.getLogger("veil.agent")

# The agent needs only what decides enrollment.
_WATCH_TYPES = (ResourceType.NAMESPACE, ResourceType.WORKLOAD)
_RETRY_MAX = 5.0
_MAX_ERRORS = 20


def agent_version() -> str:
    try:
        return importlib.metadata.version("veil-mesh")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class AgentDaemon:
    """One agent process. ``await run()`` returns when stopped (exit code)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        loader: Callable[[Path, DataplaneOptions], LoadResult] = load_in_child,
    ) -> None:
        self.config = config
        self._loader = loader
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._started_wall = time.time()
        self._started = time.monotonic()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # the first call only starts the measurement
        self._errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_ERRORS)
        self._last: ReconcileReport | None = None
        self._reconciles = 0
        self._load: LoadResult | None = None
        self._node = config.node or ""
        self._uplink = ""
        self._plane: Dataplane | None = None
        self._net: NodeNetwork | None = None
        self._store: StateStore | None = None
        self._watch: WatchClient | None = None
        self._identity: NodeIdentity | None = None
        self._programs: dict[str, int] = {}
        # What registry updates touched since the last pass; _full asks for all.
        self._dirty_keys: set[str] = set()
        self._dirty_ips: set[IPv4Address | IPv6Address] = set()
        self._full = True
        self._pending: dict[str, str] = {}  # workload key -> why it waits for its veth
        self._drop_totals = DropTotals()
        self._drops: DropMonitor | None = None  # the drop stream (veilctl monitor)
        self._status_server: StatusServer | None = None
        self.metrics = AgentMetrics(self._metrics_sample)

    # -- control -------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def request_resync(self) -> None:
        self._full = True
        self._wake.set()

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        cfg = self.config
        # Another agent answering on the status socket is the old pod of a
        # rolling update (maxSurge): this one starts anyway and takes the
        # socket over once its data plane is open (StatusServer.start); the
        # old one then stops changing the data plane. Pins and filters are
        # shared and reconciling is idempotent, so the overlap is safe.
        if another_agent_answers(cfg.status_socket):
            log.info(
                "another agent answers on %s: taking over from it once ready", cfg.status_socket
            )
        creds = node_credentials(cfg)
        self._node = creds.node
        ready = await open_dataplane(cfg, creds, self._loader)
        plane = self._plane = ready.plane
        self._load, self._net, self._uplink = ready.load, ready.net, ready.uplink
        self._programs = ready.programs
        status: StatusServer | None = None
        metrics: MetricsServer | None = None
        identity: NodeIdentity | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            self._drops = DropMonitor.for_pins(plane.layout, self._pods)
            self._drops.start()
            status = self._status_server = StatusServer(cfg.status_socket)
            self._add_routes(status)
            await status.start()
            if cfg.metrics_address is not None:
                metrics = MetricsServer(self.metrics)
                await metrics.start(*cfg.metrics_address)
            self._store = StateStore(self._node, creds.trust_domain)
            self._store.subscribe(self._on_change)
            identity = self._identity = NodeIdentity(cfg.state_dir, creds, types=_WATCH_TYPES)
            self._watch = WatchClient(
                identity, self._store, backoff=Backoff(0.2, 10.0), sleep=identity.channel.sleep
            )
            tasks = [
                asyncio.create_task(self._watch.run(), name="watch"),
                asyncio.create_task(self._reconcile_loop(), name="reconcile"),
                asyncio.create_task(identity.run(), name="identity"),
            ]
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_resync)
            stopper = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = None if task is stopper else task.exception()
                if exc is not None:
                    raise exc
            stopper.cancel()
            log.info(
                "stopping; Veil's programs stay attached (fail closed): run `veil agent "
                "uninstall` to remove them"
            )
            return 0
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if identity is not None:
                with contextlib.suppress(Exception):
                    await identity.close()
            if status is not None:
                await status.stop()
            if metrics is not None:
                await metrics.stop()
            if self._drops is not None:
                await self._drops.close()
            await ready.close()

    # -- reconcile -----------------------------------------------------------------

    def _on_change(self, change: StateChange) -> None:
        """Mark what a registry update touched (runs on the event loop, in the watch)."""
        keys = {k for t, k in change.changed if t is ResourceType.WORKLOAD}
        namespaces = {k for t, k in change.changed if t is ResourceType.NAMESPACE}
        if namespaces:
            # The controller folds namespace labels into Workload.enrolled, but a
            # namespace change must never be missed: take its workloads too.
            for snap in (change.old, change.new):
                keys |= {w.key for w in snap.local_workloads if w.namespace in namespaces}
        for key in keys:
            for snap in (change.old, change.new):
                w = snap.workloads.get(key)
                if w is not None:
                    self._dirty_ips.update(workload_addresses(w))
        self._dirty_keys |= keys
        if not change.old.synced:
            self._full = True
        if keys or self._full:
            self._wake.set()

    async def _reconcile_loop(self) -> None:
        """Reconcile after every change (only what changed), and fully every resync."""
        assert self._store is not None
        await self._store.wait_synced()
        self._full = True
        retry_delay = self.config.veth_retry
        while True:
            if self._superseded():
                # A newer agent owns the node now; stay out of its way (no
                # second writer, no older programs re-attached over its
                # newer ones) until SIGTERM. Exiting instead would get this
                # container restarted, and it would take the socket back.
                await self._stop.wait()
                return
            self._wake.clear()
            scope: tuple[set[str], set[IPv4Address | IPv6Address]] | None = None
            if not self._full:
                scope = (self._dirty_keys, self._dirty_ips)
            self._full, self._dirty_keys, self._dirty_ips = False, set(), set()
            try:
                retry_keys, retry_ips = await asyncio.to_thread(self._reconcile_once, scope)
            except Exception as exc:
                # Whatever broke (netlink, a map), the pins keep the node fail
                # closed; record it and try again rather than exit.
                log.exception("reconcile failed")
                self._errors.append({"at": time.time(), "error": f"reconcile failed: {exc}"})
                self.metrics.pass_failed()
                self._full, retrying = True, True
            else:
                self._dirty_keys |= retry_keys
                self._dirty_ips |= retry_ips
                retrying = bool(retry_keys or retry_ips)
            if retrying:
                delay = retry_delay
                retry_delay = min(retry_delay * 2, _RETRY_MAX)
            else:
                delay = self.config.resync_interval
                retry_delay = self.config.veth_retry
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                if not retrying:
                    self._full = True  # periodic resync: repair drift

    def _superseded(self) -> bool:
        server = self._status_server
        if server is None or not server.taken_over:
            return False
        log.warning(
            "a newer agent took over the status socket %s: this agent stops reconciling and "
            "leaves the data plane to it (programs stay attached)",
            server.socket_path,
        )
        return True

    def _desired(self, workloads: Iterable[Workload] | None = None) -> DesiredState:
        assert self._store is not None and self._net is not None
        snap = self._store.current
        return desired_pods(
            snap.local_workloads if workloads is None else workloads,
            self._node,
            self._net.veth_for,
            owner_of=snap.workload_by_ip,
        )

    def _scoped(
        self, keys: set[str], ips: set[IPv4Address | IPv6Address]
    ) -> tuple[DesiredState, list[PodDataplaneState]]:
        """Desired and actual state of the changed workloads and every address they touch.

        Any local workload holding one of those addresses is included, so an
        address handed from one workload to another is never unenrolled by a
        partial view.
        """
        assert self._store is not None and self._plane is not None
        local = self._store.current.local_workloads
        concerned = set(ips)
        for w in local:
            if w.key in keys:
                concerned.update(workload_addresses(w))
        chosen = [
            w for w in local if w.key in keys or concerned.intersection(workload_addresses(w))
        ]
        desired = self._desired(chosen)
        plane = self._plane
        # A new pod (the common change) has no entry on its veth: one map lookup
        # says so, instead of scanning every pod entry for its address. A stale
        # entry elsewhere is dropped by enroll() itself.
        fresh = {
            d.ip
            for d in desired.pods
            if d.ifindex is not None
            and (
                (entry := plane.maps.pod(d.ifindex)) is None
                # An IPv6-only pod's entry holds 0.0.0.0: look it up by address below.
                or (isinstance(d.ip, IPv4Address) and entry.ip != d.ip)
            )
        }
        concerned.update(d.ip for d in desired.pods)
        actual = [
            state
            for ip in sorted(concerned - fresh, key=address_order)
            if (state := plane.pod(ip)) is not None
        ]
        return desired, actual

    def _reconcile_once(
        self, scope: tuple[set[str], set[IPv4Address | IPv6Address]] | None
    ) -> tuple[set[str], set[IPv4Address | IPv6Address]]:
        """One pass in a worker thread: plan against the kernel, apply, report.

        ``scope`` limits the pass to changed workloads and addresses (None: all).
        Returns what to retry (pods without a veth, failed actions).
        """
        assert self._store is not None and self._plane is not None
        plane = self._plane
        t0 = time.monotonic()
        at = time.time()
        version = self._store.current.version
        if scope is None:
            desired, actual = self._desired(), plane.pods()
        else:
            desired, actual = self._scoped(*scope)
        actions = plan(desired.pods, actual, programs=self._programs)
        done: list[str] = []
        errors: list[str] = []
        pending: list[str] = []
        retry_keys: set[str] = set()
        retry_ips: set[IPv4Address | IPv6Address] = set()
        waiting: dict[str, str] = {}
        for action in actions:
            line = describe(action)
            if isinstance(action, AwaitVeth):
                pending.append(line)
                retry_keys.add(action.pod.key)
                waiting[action.pod.key] = line
                continue
            try:
                _apply(plane, action)
            except AgentError as exc:
                errors.append(f"{line}: failed: {exc}")
                log.warning("%s: failed: %s", line, exc)
                if isinstance(action, Unenroll):
                    retry_ips.add(action.ip)
                else:
                    retry_keys.add(action.pod.key)
                continue
            done.append(line)
            log.info("%s", line)
            if isinstance(action, Enroll | Refresh):
                _reset_flows(action)
        report = ReconcileReport(
            at=at,
            duration_s=time.monotonic() - t0,
            state_version=version,
            full=scope is None,
            actions=tuple(done),
            errors=tuple(errors),
            pending=tuple(pending),
        )
        log.debug(
            "reconcile (%s): %d actions in %.1f ms",
            "full" if scope is None else f"{len(desired.pods)} pods",
            len(done),
            report.duration_s * 1000,
        )
        for e in errors:
            self._errors.append({"at": at, "error": e})
        # A partial pass only speaks for the workloads it looked at.
        if scope is None:
            self._pending = waiting
        else:
            self._pending = {
                k: v
                for k, v in self._pending.items()
                if k not in {d.key for d in desired.pods} and k not in scope[0]
            } | waiting
        self._last = report
        self._reconciles += 1
        self.metrics.reconciled(
            full=report.full, seconds=report.duration_s, failed_actions=len(errors)
        )
        return retry_keys, retry_ips

    def _metrics_sample(self) -> DataplaneSample:
        """Scrape-time view of the maps (runs in the metrics server's worker thread)."""
        plane = self._plane
        if plane is None:
            return DataplaneSample()
        store = self._store
        return read_sample(
            plane.maps,
            store.current if store is not None else None,
            self._drop_totals,
            pending=len(self._pending),
        )

    # -- status API ----------------------------------------------------------------

    def _add_routes(self, server: StatusServer) -> None:
        server.route("/status", self._status)
        server.route("/pods", self._pods)
        server.route("/workloads", self._workloads)
        server.route("/bpf/maps", self._maps)
        server.route("/bpf/source", self._source)
        server.route("/verify", self._verify)
        # Runtime log levels and the drop stream (veilctl log, veilctl monitor).
        server.route("/logging", self._log_levels)
        server.route_post("/logging", self._set_log_levels)
        server.route_stream("/monitor", self._monitor)

    async def _log_levels(self) -> dict[str, object]:
        return current_levels()

    async def _set_log_levels(self, body: Mapping[str, Any]) -> dict[str, object]:
        spec = body.get("level")
        if not isinstance(spec, str):
            raise LogLevelError('expected a JSON body {"level": "COMPONENT=LEVEL"}')
        applied = apply_levels(parse_level_spec(spec), "veil.agent")
        log.warning("log levels changed through the status API: %s", applied)
        return {"applied": applied, **current_levels()}

    def _monitor(self, query: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        assert self._drops is not None
        return self._drops.subscribe(query)

    async def _status(self) -> dict[str, Any]:
        assert self._plane is not None
        node = await asyncio.to_thread(self._plane.node)
        pods = await asyncio.to_thread(self._plane.pods)
        snap = self._store.current if self._store is not None else None
        mem = self._proc.memory_info()
        return {
            "node": self._node,
            "version": agent_version(),
            "pid": os.getpid(),
            # The DaemonSet pod this agent runs in (downward API), so a probe
            # can tell its own agent from the other pod's during a surge.
            "pod": os.environ.get("VEIL_POD_NAME") or None,
            "superseded": bool(self._status_server and self._status_server.taken_over),
            "started_at": self._started_wall,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "cpu_percent": self._proc.cpu_percent(None),
            "rss_bytes": mem.rss,
            "uplink": self._uplink,
            "dataplane": node.to_dict(),
            "load": {
                "reused_pins": self._load.reused if self._load else None,
                "seconds": round(self._load.seconds, 3) if self._load else None,
                "preflight": list(self._load.preflight) if self._load else [],
            },
            "watch": self._watch.status().to_json() if self._watch is not None else None,
            "node_identity": self._identity.status() if self._identity is not None else None,
            "registry": {
                "synced": bool(snap and snap.synced),
                "version": snap.version if snap else 0,
                "local_workloads": len(snap.local_workloads) if snap else 0,
            },
            "pods": {
                "entries": len(pods),
                "enrolled": sum(1 for p in pods if p.enrolled),
                "protected": sum(1 for p in pods if p.protected),
            },
            "reconciles": self._reconciles,
            "last_reconcile": self._last.to_dict() if self._last else None,
            "pending": [self._pending[k] for k in sorted(self._pending)],
            "errors": list(self._errors),
        }

    async def _pods(self) -> list[dict[str, Any]]:
        assert self._plane is not None
        if self._store is None or not self._store.current.synced:
            actual = await asyncio.to_thread(self._plane.pods)
            return pod_rows((), actual, self._programs)
        desired = await asyncio.to_thread(self._desired)
        actual = await asyncio.to_thread(self._plane.pods)
        return pod_rows(desired.pods, actual, self._programs)

    async def _workloads(self) -> list[dict[str, Any]]:
        if self._store is None:
            return []
        return workload_rows(self._store.current.local_workloads)

    async def _maps(self) -> dict[str, Any]:
        assert self._plane is not None
        dump = await asyncio.to_thread(self._plane.maps_dump)
        return {"pin_dir": str(self._plane.pin_dir), **dump.to_dict()}

    async def _source(self) -> dict[str, Any]:
        assert self._plane is not None
        unit = self._plane.source()
        return {
            "build_id": unit.build_id,
            "cflags": list(unit.cflags),
            "files": [str(f.path) for f in unit.files],
            "headers": [str(h.path) for h in unit.headers],
            "source": unit.render(),
        }

    def _audit_input(self) -> AuditInput:
        assert self._plane is not None and self._store is not None
        plane = self._plane
        synced = self._store.current.synced
        desired = self._desired() if synced else DesiredState(())
        dump = plane.maps_dump()
        return AuditInput(
            synced=synced,
            desired=desired.pods,
            pods=tuple(plane.pods()),
            local_ips={e.ip: e.ifindex for e in dump.local_ips},
            node=plane.node(),
            cflags=plane.source().cflags,
            listening=tcp_listeners(),
            ignored=desired.ignored,
        )

    async def _verify(self) -> dict[str, Any]:
        report = audit(await asyncio.to_thread(self._audit_input))
        return {"node": self._node, **report.to_dict()}


def _reset_flows(action: Enroll | Refresh) -> None:
    """Aborts the TCP connections a pod opened before it was enrolled: from
    now on their packets reach the ztunnel, which has no socket for them, so
    they would stall until the application's own timeout."""
    pod = action.pod
    if not pod.enrolled or pod.ifindex is None:
        return
    with contextlib.closing(IPRoute(groups=0)) as ipr:
        result = reset_pod_tcp(ipr, pod.ifindex)
    if result.destroyed:
        log.info("%s: reset %d connection(s) opened before enrollment", pod.key, result.destroyed)
    elif result.skipped:
        log.debug("%s: connections not reset: %s", pod.key, result.skipped)


def _apply(plane: Dataplane, action: Enroll | MarkLocal | Refresh | Unenroll) -> None:
    if isinstance(action, Unenroll):
        plane.unenroll(action.ip)
    elif isinstance(action, Enroll) or (isinstance(action, Refresh) and action.pod.enrolled):
        plane.enroll(action.pod.ip, action.pod.host_ifname, ipv6=action.pod.ipv6)
    else:
        plane.mark_local_pod(action.pod.ip, action.pod.host_ifname, ipv6=action.pod.ipv6)


def run_agent(config: AgentConfig) -> int:
    """``veil agent run``: serve until SIGTERM; returns the exit code."""
    return asyncio.run(AgentDaemon(config).run())
