"""Recent policy denies, and a live feed of them for ``veilctl monitor``.

The proxy reports every refused or re-check-closed connection through
:class:`~ztunnel.metrics.TrafficMetrics`; :meth:`DenyFeed.publish` keeps the
last few hundred (``/denies`` shows them) and hands each one to the admin
streams following ``/denies?follow=1``. A slow reader cannot hold the data
path: each follower has a bounded queue and misses events (counted, and
reported in the stream) rather than making the proxy wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from ..metrics.traffic import ConnectionReport

__all__ = ["DenyFeed", "deny_event"]

_CLOSED: dict[str, Any] = {"type": "closed"}


def deny_event(report: ConnectionReport, at: datetime | None = None) -> dict[str, Any]:
    """One deny as the monitor shows it: time, tuple, workloads, policy, reason."""
    entry = report.to_json()
    when = (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "type": "deny",
        "time": when,
        "direction": entry["direction"],
        "src": entry["src"],
        "dst": entry["dst"],
        "src_workload": entry["src_workload"],
        "dst_workload": entry["dst_workload"],
        "src_identity": entry["src_identity"],
        "dst_identity": entry["dst_identity"],
        "policy": entry["policy"],
        "reason": entry["reason"],
        "response_flags": entry["response_flags"],
    }


class DenyFeed:
    """A bounded history of denies plus live subscribers (one event loop)."""

    def __init__(self, history: int = 256, queue_size: int = 1024) -> None:
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self._followers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._queue_size = queue_size
        self.missed = 0
        self.total = 0
        self._closed = False

    def publish(self, report: ConnectionReport) -> None:
        """Called by the proxy for each deny: never blocks, never raises."""
        if report.verdict != "deny":
            return
        self.publish_event(deny_event(report))

    def publish_event(self, event: dict[str, Any]) -> None:
        """Adds one :func:`deny_event` (a worker process of a multi-core
        ztunnel reports its denies to the supervisor this way)."""
        self.total += 1
        self._recent.append(event)
        for q in self._followers:
            try:
                if q.qsize() < self._queue_size:
                    q.put_nowait(event)
                else:
                    self.missed += 1
            except asyncio.QueueFull:
                self.missed += 1

    def recent(self) -> list[dict[str, Any]]:
        return list(self._recent)

    def close(self) -> None:
        """Ends every follower's stream (the admin server is stopping)."""
        self._closed = True
        for q in self._followers:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(_CLOSED)

    async def follow(self, heartbeat: float = 15.0) -> AsyncIterator[dict[str, Any]]:
        """Every deny from now on; a heartbeat line when idle keeps proxies and
        readers from mistaking a quiet node for a dead stream."""
        if self._closed:
            return
        # One slot more than publishers use, so close() always finds room.
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self._queue_size + 1)
        self._followers.add(q)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(q.get(), heartbeat)
                except TimeoutError:
                    yield {"type": "heartbeat", "missed": self.missed}
                    continue
                if event is _CLOSED:
                    return
                yield event
        finally:
            with contextlib.suppress(KeyError):
                self._followers.remove(q)
