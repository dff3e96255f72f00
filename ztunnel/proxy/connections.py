"""The registry of live proxied connections.

Every connection a listener accepts is registered here for its whole life.
The registry answers three needs:

* operators: ``/config_dump`` on the admin API lists each live connection with
  addresses, workloads, identities, bytes each way, age and verdict
  (:meth:`ConnectionRegistry.dump`);
* policy: on every control-plane change the connections this node authorized
  are checked again against the new snapshot, and those no longer allowed are
  closed (:meth:`ConnectionRegistry.recheck`);
* drain: at shutdown the registry says how many connections are left and
  closes the remainder when the grace period ends.

A connection is closed by cancelling the task that proxies it (or, for a held
inbound connection, the future it ends on); its handler resets both sides and
writes the access log line with the reason set here. The decision itself is the policy package's pure re-check.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.api.model import Service, Workload
from controller.api.spiffe import SpiffeId
from node.policy import Connection, Verdict, recheck
from node.state import Snapshot
from ztunnel.metrics import ConnectionLabels, ConnectionReport, Reporter

from .errors import (
    FLAG_DOWNSTREAM_CLOSED,
    FLAG_NO_ROUTE,
    FLAG_POLICY_DENIED,
    FLAG_UPSTREAM_CLOSED,
    FLAG_UPSTREAM_FAILURE,
)
from .relay import ByteCounters, Counters
from .sockets import Address

__all__ = [
    "FLAG_DOWNSTREAM_CLOSED",
    "FLAG_NO_ROUTE",
    "FLAG_POLICY_DENIED",
    "FLAG_UPSTREAM_CLOSED",
    "FLAG_UPSTREAM_FAILURE",
    "ConnectionInfo",
    "ConnectionRegistry",
    "Direction",
    "LiveConnection",
]

log = logging.getLogger("veil.ztunnel.proxy")


class Direction(enum.Enum):
    """Which listener accepted the connection."""

    OUTBOUND = "outbound"  # 15001, from a local pod
    INBOUND = "inbound"  # 15008, HBONE from a peer ztunnel
    INBOUND_PLAINTEXT = "inbound_plaintext"  # 15006, from outside the mesh


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What is fixed about a connection when it is accepted and routed."""

    direction: Direction
    src: Address
    dst: Address
    route: str  # hbone, same_node, passthrough (outbound); inbound; inbound_plaintext
    src_workload: Workload | None = None
    dst_workload: Workload | None = None
    src_identity: SpiffeId | None = None
    dst_identity: SpiffeId | None = None
    # The destination Service (VIP dialled, or the one selecting the inbound
    # destination), for the metrics' destination_service labels.
    service: Service | None = None

    def reporter(self) -> Reporter:
        return Reporter.SOURCE if self.direction is Direction.OUTBOUND else Reporter.DESTINATION

    def labels(self) -> ConnectionLabels:
        """Metric labels as the connection opens (no response flags yet)."""
        return ConnectionLabels.of(
            self.reporter(),
            self.src_workload,
            self.src_identity,
            self.dst_workload,
            self.dst_identity,
            service=self.service,
            route=self.route,
        )


@dataclass(eq=False, slots=True)
class LiveConnection:
    """One registered connection. Mutable: counters, verdict and close reason
    change while it lives; only the proxy task and the registry write them."""

    id: int
    info: ConnectionInfo
    # What this node authorized (None when the peer enforces policy, as for
    # outbound HBONE and passthrough), kept so it can be decided again.
    authz: Connection | None
    counters: Counters = field(default_factory=ByteCounters)
    verdict: str = "allow"
    started_wall: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    close_reason: str | None = None
    close_flags: str = "-"
    # What close() cancels: the task proxying the connection, or the future a
    # held connection without a task ends on (see proxy.inbound).
    task: asyncio.Future[Any] | None = None

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started

    def track_bytes(self) -> ByteCounters:
        """Fresh counters for a plaintext relay, shown live by this record."""
        counters = ByteCounters()
        self.counters = counters
        return counters

    def close(self, reason: str, flags: str = FLAG_DOWNSTREAM_CLOSED) -> None:
        """Asks the proxy task to reset both sides; ``reason`` and ``flags`` go
        to its access log line."""
        if self.close_reason is None:
            self.close_reason = reason
            self.close_flags = flags
        if self.task is not None and not self.task.done():
            self.task.cancel(reason)

    def to_json(self) -> dict[str, Any]:
        """One ``/config_dump`` entry. Byte names follow the access log (Istio's
        direction): ``bytes_received`` from the client, ``bytes_sent`` back to it."""
        i = self.info
        return {
            "id": self.id,
            "direction": i.direction.value,
            "route": i.route,
            "src": str(i.src),
            "dst": str(i.dst),
            "src_workload": i.src_workload.key if i.src_workload else None,
            "dst_workload": i.dst_workload.key if i.dst_workload else None,
            "src_identity": str(i.src_identity) if i.src_identity else None,
            "dst_identity": str(i.dst_identity) if i.dst_identity else None,
            "bytes_received": self.counters.from_client,
            "bytes_sent": self.counters.to_client,
            "started": self.started_wall,
            "duration_s": round(self.duration, 3),
            "verdict": self.verdict,
            # True while the same-node kernel splice carries it (SpliceCounters).
            "spliced": bool(getattr(self.counters, "spliced", False)),
        }

    def report(
        self,
        *,
        error: str | None = None,
        response_flags: str | None = None,
        policy: str | None = None,
    ) -> ConnectionReport:
        """The access-log and metrics record of this connection as it ends.

        ``response_flags`` defaults to the flags of :meth:`close` ("-" if the
        connection simply ended)."""
        i = self.info
        if response_flags is None:
            response_flags = self.close_flags
        denied = self.verdict.startswith("deny")
        reason = self.close_reason or (self.verdict[len("deny: ") :] if denied else "")
        return ConnectionReport(
            reporter=i.reporter(),
            src_addr=(i.src.ip, i.src.port),
            dst_addr=(i.dst.ip, i.dst.port),
            src_workload=i.src_workload,
            dst_workload=i.dst_workload,
            src_principal=i.src_identity,
            dst_principal=i.dst_identity,
            received_bytes=self.counters.from_client,
            sent_bytes=self.counters.to_client,
            duration=self.duration,
            verdict="deny" if denied else "allow",
            reason=reason,
            policy=policy,
            error=error,
            response_flags=response_flags,
            direction=i.direction.value,
            route=i.route,
            service=i.service,
        )


class ConnectionRegistry:
    """Live connections of one ztunnel, by id."""

    def __init__(self) -> None:
        self._conns: dict[int, LiveConnection] = {}
        self._ids = itertools.count(1)
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator[LiveConnection]:
        return iter(list(self._conns.values()))

    def add(
        self,
        info: ConnectionInfo,
        *,
        authz: Connection | None = None,
        verdict: str = "allow",
        task: asyncio.Future[Any] | None = None,
    ) -> LiveConnection:
        """Registers a connection proxied by ``task`` (default: the current task)."""
        conn = LiveConnection(
            id=next(self._ids),
            info=info,
            authz=authz,
            verdict=verdict,
            task=task if task is not None else asyncio.current_task(),
        )
        self._conns[conn.id] = conn
        self._empty.clear()
        return conn

    def remove(self, conn: LiveConnection) -> None:
        self._conns.pop(conn.id, None)
        if not self._conns:
            self._empty.set()

    def get(self, conn_id: int) -> LiveConnection | None:
        return self._conns.get(conn_id)

    def dump(self) -> list[dict[str, Any]]:
        """JSON-ready list of live connections, oldest first (for /config_dump)."""
        return [c.to_json() for c in sorted(self._conns.values(), key=lambda c: c.id)]

    def recheck(self, snapshot: Snapshot) -> list[LiveConnection]:
        """Re-authorizes every connection this node authorized against
        ``snapshot``; closes those it no longer allows. Returns them."""
        live = [(c, c.authz) for c in self._conns.values() if c.authz is not None]
        live = [(c, a) for c, a in live if c.close_reason is None]
        if not live:
            return []
        try:
            denied: Sequence[tuple[LiveConnection, Verdict]] = recheck(snapshot, live)
        except Exception as e:
            # Fail closed: a decision that cannot be made is a deny.
            log.exception("policy re-check failed; closing the connections it covered")
            denied = [(c, Verdict(False, f"policy re-check failed: {e}")) for c, _ in live]
        closed: list[LiveConnection] = []
        for conn, verdict in denied:
            reason = verdict.reason
            conn.verdict = f"deny: {reason}"
            conn.close(f"policy re-check: {reason}", FLAG_POLICY_DENIED)
            closed.append(conn)
        if closed:
            log.info("policy re-check closed %d live connection(s)", len(closed))
        return closed

    def close_all(self, reason: str) -> int:
        """Closes every live connection; returns how many were asked to close."""
        conns = list(self._conns.values())
        for c in conns:
            c.close(reason)
        return len(conns)

    async def wait_empty(self, timeout: float | None = None) -> bool:
        """Waits until no connection is registered; False on timeout."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            return False
        return True
