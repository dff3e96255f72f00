"""The node agent process: load the data plane, watch the registry, keep pods enrolled.

Startup, in order (each failure is an AgentError naming the fix, never a traceback):

1. node credentials from ``veil node join`` (the state dir shared with the ztunnel);
2. preflight and program loading in a child process (agent.daemon.loader), so
   this long-lived process never maps the compiler;
3. ``Dataplane.open`` on the pins the child left: same build, so nothing is
   compiled and no filter changes. Pods enrolled by a previous agent stay
   steered throughout, which is why a restart opens no window;
4. ``setup_node``: policy routing and the uplink program;
5. the status API on the unix socket, the controller watch (namespaces and
   workloads only) and the reconcile loop.

Reconciling starts only once the registry has been received: until then the
pins keep whatever the previous agent enrolled, and nothing is removed on the
strength of an empty view. Afterwards every registry change triggers a pass;
a pass also runs every ``resync_interval`` to repair drift (someone detached
a filter) and sooner while a pod waits for its veth. SIGHUP asks for a pass
at once.

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
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from agent.bpf import Dataplane, DataplaneOptions
from agent.errors import AgentError
from agent.status import StatusServer
from controller.api.model import ResourceType, WatchUpdate
from controller.node import NodeCredentials, load_node_credentials
from ztunnel.state import StateChange, StateStore
from ztunnel.xds import Backoff, WatchClient

from .audit import AuditInput, audit
from .config import AgentConfig
from .errors import AgentStartupError
from .loader import LoadResult, load_in_child
from .netinfo import NodeNetwork, tcp_listeners
from .reconcile import (
    AwaitVeth,
    DesiredState,
    Enroll,
    MarkLocal,
    Refresh,
    Unenroll,
    describe,
    desired_pods,
    plan,
)
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


class _RegistryScope:
    """The controller client, asking only for namespaces and workloads."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def watch(
        self,
        node: str = "",
        types: Iterable[ResourceType] = (),
        epoch: str = "",
        version: int = 0,
    ) -> AsyncIterator[WatchUpdate]:
        stream: AsyncIterator[WatchUpdate] = self._client.watch(node, _WATCH_TYPES, epoch, version)
        return stream


def _socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


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
        self._programs: dict[str, int] = {}

    # -- control -------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def request_resync(self) -> None:
        self._wake.set()

    # -- lifecycle -----------------------------------------------------------------

    def _credentials(self) -> NodeCredentials:
        creds = load_node_credentials(self.config.state_dir)
        if self.config.node and self.config.node != creds.node:
            raise AgentStartupError(
                f"the credentials in {self.config.state_dir} belong to node {creds.node!r}, "
                f"not {self.config.node!r}",
                hint="pass the matching --state-dir, or join this node again with "
                "`veil node join --node <name>`",
            )
        return creds

    async def run(self) -> int:
        cfg = self.config
        if _socket_answers(cfg.status_socket):
            raise AgentStartupError(
                f"another agent is running on this node (its status socket {cfg.status_socket} "
                "answers)",
                hint="stop it first, or give this one another --status-socket and --pin-dir",
            )
        creds = self._credentials()
        self._node = creds.node
        options = DataplaneOptions(drop_udp=cfg.drop_udp)
        log.info("node %s: preflight and BPF programs (pins in %s)", self._node, cfg.pin_dir)
        self._load = await asyncio.to_thread(self._loader, cfg.pin_dir, options)
        plane = await asyncio.to_thread(Dataplane.open, cfg.pin_dir, options)
        self._plane = plane
        status: StatusServer | None = None
        client: Any = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            if plane.build_id != self._load.build_id:
                log.warning("pins changed between loading and opening; the agent compiled itself")
            # pyroute2's synchronous API runs its own event loop: never on this one.
            net = await asyncio.to_thread(NodeNetwork)
            self._net = net
            if cfg.uplink is not None:
                self._uplink = cfg.uplink
            else:
                self._uplink = await asyncio.to_thread(net.detect_uplink, creds.controller_address)
            await asyncio.to_thread(plane.setup_node, self._uplink, probe_source=cfg.probe_source)
            node_state = await asyncio.to_thread(plane.node)
            self._programs = {p.name: p.prog_id for p in node_state.programs}
            log.info(
                "data plane ready: build %s (%s), uplink %s, programs %s",
                plane.build_id[:12],
                "pins reused" if self._load.reused else f"loaded in {self._load.seconds:.1f}s",
                self._uplink,
                self._programs,
            )
            status = StatusServer(cfg.status_socket)
            self._add_routes(status)
            await status.start()
            self._store = StateStore(self._node, creds.trust_domain)
            self._store.subscribe(self._on_change)
            client = creds.client()
            self._watch = WatchClient(_RegistryScope(client), self._store, backoff=Backoff(0.2, 10.0))
            tasks = [
                asyncio.create_task(self._watch.run(), name="watch"),
                asyncio.create_task(self._reconcile_loop(), name="reconcile"),
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
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
            if status is not None:
                await status.stop()
            if self._net is not None:
                await asyncio.to_thread(self._net.close)
            await asyncio.to_thread(plane.close)

    # -- reconcile -----------------------------------------------------------------

    def _on_change(self, change: StateChange) -> None:
        touched = change.changed_types() & {ResourceType.WORKLOAD, ResourceType.NAMESPACE}
        if touched or not change.old.synced:
            self._wake.set()

    async def _reconcile_loop(self) -> None:
        assert self._store is not None
        await self._store.wait_synced()
        retry = self.config.veth_retry
        full = True
        while True:
            self._wake.clear()
            try:
                report = await asyncio.to_thread(self._reconcile_once, full)
            except Exception as exc:
                # Whatever broke (netlink, a map), the pins keep the node fail
                # closed; record it and try again rather than exit.
                log.exception("reconcile failed")
                self._errors.append({"at": time.time(), "error": f"reconcile failed: {exc}"})
                report = None
            if report is None or report.pending or report.errors:
                delay = retry
                retry = min(retry * 2, _RETRY_MAX)
            else:
                delay = self.config.resync_interval
                retry = self.config.veth_retry
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
                full = False
            except TimeoutError:
                full = True

    def _desired(self) -> DesiredState:
        assert self._store is not None and self._net is not None
        snap = self._store.current
        return desired_pods(
            snap.local_workloads, self._node, self._net.veth_for, owner_of=snap.workload_by_ip
        )

    def _reconcile_once(self, full: bool) -> ReconcileReport:
        """One pass (in a worker thread): plan against the kernel, apply, report."""
        assert self._store is not None and self._plane is not None
        plane = self._plane
        t0 = time.monotonic()
        at = time.time()
        version = self._store.current.version
        desired = self._desired()
        actions = plan(desired.pods, plane.pods(), programs=self._programs)
        done: list[str] = []
        errors: list[str] = []
        pending: list[str] = []
        for action in actions:
            line = describe(action)
            if isinstance(action, AwaitVeth):
                pending.append(line)
                continue
            try:
                _apply(plane, action)
            except AgentError as exc:
                errors.append(f"{line}: failed: {exc}")
                log.warning("%s: failed: %s", line, exc)
                continue
            done.append(line)
            log.info("%s", line)
        report = ReconcileReport(
            at=at,
            duration_s=time.monotonic() - t0,
            state_version=version,
            full=full,
            actions=tuple(done),
            errors=tuple(errors),
            pending=tuple(pending),
        )
        for e in errors:
            self._errors.append({"at": at, "error": e})
        self._last = report
        self._reconciles += 1
        return report

    # -- status API ----------------------------------------------------------------

    def _add_routes(self, server: StatusServer) -> None:
        server.route("/status", self._status)
        server.route("/pods", self._pods)
        server.route("/workloads", self._workloads)
        server.route("/bpf/maps", self._maps)
        server.route("/bpf/source", self._source)
        server.route("/verify", self._verify)

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


def _apply(plane: Dataplane, action: Enroll | MarkLocal | Refresh | Unenroll) -> None:
    if isinstance(action, Unenroll):
        plane.unenroll(action.ip)
    elif isinstance(action, Enroll) or (isinstance(action, Refresh) and action.pod.enrolled):
        plane.enroll(action.pod.ip, action.pod.host_ifname)
    else:
        plane.mark_local_pod(action.pod.ip, action.pod.host_ifname)


def run_agent(config: AgentConfig) -> int:
    """``veil agent run``: serve until SIGTERM; returns the exit code."""
    return asyncio.run(AgentDaemon(config).run())
