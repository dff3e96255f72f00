"""The agent's drop stream for ``veilctl monitor --type drop``.

Primary source: the pinned ``drop_events`` ring buffer the BPF programs write
one record to per reported drop (reason, pod veth, packet tuple; rate limited
per CPU in the kernel, see ebpf/include/veil_events.h). :class:`DropMonitor`
reads it on the event loop whenever the ring's fd is readable, resolves the
veth to its pod, and fans each event out to every subscriber whose filter
(``namespace``, ``pod``, ``reason``) matches. Each subscriber has a bounded
queue: a slow one loses events, never the agent's memory, and is told how
many with a ``lost`` event; records the kernel's rate limit swallowed are
reported the same way.

Fallback (no ring buffer, e.g. a kernel without BPF ring buffers): successive
reads of the per-pod drop counters turn into ``drop`` events with a count and
no tuple (:func:`drop_deltas`, :func:`follow_drops`).

The pure parts (:func:`drop_event_dict`, :class:`DropFilter`,
:func:`drop_deltas`) are unit tested without a kernel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from agent.bpf.events import DropEvent, DropEventReader
from agent.bpf.pins import PinLayout
from veil.errors import VeilError

__all__ = [
    "DropCounts",
    "DropFilter",
    "DropMonitor",
    "drop_deltas",
    "drop_event_dict",
    "follow_drops",
]

log = logging.getLogger("veil.agent.monitor")

ReadPods = Callable[[], Awaitable[Sequence[Mapping[str, Any]]]]
# Events a subscriber may have queued before it starts losing them.
QUEUE_SIZE: Final = 1024
# Events read from the ring but not yet handed out (a burst the loop has not
# caught up with); beyond this they count as lost for everyone.
_BACKLOG: Final = 8192
# How stale the veth -> pod index may be before an unknown veth refreshes it.
_POD_INDEX_TTL: Final = 1.0

# (pod key or veth, reason) -> packets dropped so far.
DropCounts = dict[tuple[str, str], int]


def _pod_id(row: Mapping[str, Any]) -> str:
    return str(row.get("workload") or row.get("veth") or row.get("ip") or "?")


def counts_of(rows: Sequence[Mapping[str, Any]]) -> DropCounts:
    out: DropCounts = {}
    for row in rows:
        for reason, n in (row.get("drops") or {}).items():
            out[(_pod_id(row), str(reason))] = int(n)
    return out


def drop_deltas(
    previous: DropCounts, rows: Sequence[Mapping[str, Any]], at: datetime | None = None
) -> tuple[list[dict[str, Any]], DropCounts]:
    """Events for every (pod, reason) whose count grew since ``previous``.

    A count that went down (the pod was removed and re-enrolled, its row
    recreated) restarts from zero rather than reporting a negative drop.
    """
    when = (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    current = counts_of(rows)
    by_pod = {_pod_id(r): r for r in rows}
    events = []
    for (pod, reason), n in sorted(current.items()):
        before = previous.get((pod, reason), 0)
        grown = n - before if n >= before else n
        if grown <= 0:
            continue
        row = by_pod.get(pod, {})
        events.append(
            {
                "type": "drop",
                "time": when,
                "pod": row.get("workload"),
                "veth": row.get("veth"),
                "ip": row.get("ip"),
                "reason": reason,
                "count": grown,
                "total": n,
            }
        )
    return events, current


async def follow_drops(
    read_pods: Callable[[], Awaitable[Sequence[Mapping[str, Any]]]],
    interval: float = 0.5,
    heartbeat: float = 15.0,
) -> AsyncIterator[dict[str, Any]]:
    """Drop events from now on (drops before the stream started are not replayed)."""
    _, counts = drop_deltas({}, await read_pods())
    idle = 0.0
    while True:
        await asyncio.sleep(interval)
        events, counts = drop_deltas(counts, await read_pods())
        for e in events:
            yield e
        idle = 0.0 if events else idle + interval
        if idle >= heartbeat:
            idle = 0.0
            yield {"type": "heartbeat"}


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def drop_event_dict(
    event: DropEvent, pod: Mapping[str, Any] | None, wall: float | None = None
) -> dict[str, Any]:
    """The JSON document of one drop: reason, pod and tuple."""
    return {
        "type": "drop",
        "time": _iso(event.wall_time() if wall is None else wall),
        "pod": pod.get("workload") if pod else None,
        "namespace": pod.get("namespace") if pod else None,
        "veth": pod.get("veth") if pod else None,
        "ip": pod.get("ip") if pod else None,
        **event.to_dict(),
    }


def lost_event(count: int, why: str) -> dict[str, Any]:
    return {"type": "lost", "time": _iso(time.time()), "count": count, "why": why}


@dataclass(frozen=True)
class DropFilter:
    """What one subscriber asked for: ``?namespace=NS&pod=[NS/]NAME&reason=LABEL``."""

    namespace: str | None = None
    pod: str | None = None
    reason: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> DropFilter:
        return cls(
            namespace=query.get("namespace") or None,
            pod=query.get("pod") or query.get("workload") or None,
            reason=query.get("reason") or None,
        )

    def matches(self, event: Mapping[str, Any]) -> bool:
        """``lost`` events always pass: they are about the stream, not a pod."""
        if event.get("type") != "drop":
            return True
        if self.reason is not None and event.get("reason") != self.reason:
            return False
        key = event.get("pod")
        if self.namespace is None and self.pod is None:
            return True
        if not isinstance(key, str):
            return False  # a veth no workload owns matches no pod filter
        ns, _, name = key.partition("/")
        if self.pod is not None:
            if "/" in self.pod:
                return key == self.pod
            if name != self.pod:
                return False
        return self.namespace is None or ns == self.namespace


@dataclass(eq=False)  # identity: kept in a set
class _Subscriber:
    filter: DropFilter
    queue: asyncio.Queue[dict[str, Any]]
    missed: int = 0


@dataclass
class _PodIndex:
    by_ifindex: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    at: float = float("-inf")


class DropMonitor:
    """Reads the drop ring buffer on the event loop and fans events out to subscribers.

    ``reader`` None with ``fallback`` means no ring buffer: subscribers get
    the counter-based stream. Without ``fallback`` events come only from
    :meth:`handle` (how the pure fan-out is tested). Runs on one event loop;
    :meth:`start` and :meth:`close` are called from it.
    """

    def __init__(
        self,
        reader: DropEventReader | None,
        read_pods: ReadPods,
        *,
        queue_size: int = QUEUE_SIZE,
        heartbeat: float = 15.0,
        fallback: bool = True,
    ) -> None:
        self._reader = reader
        self._fallback = fallback and reader is None
        self._read_pods = read_pods
        self._queue_size = queue_size
        self._heartbeat = heartbeat
        self._subs: set[_Subscriber] = set()
        self._backlog: collections.deque[DropEvent] = collections.deque()
        self._wake = asyncio.Event()
        self._pods = _PodIndex()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events = 0  # drop events handed out (to anyone) since start
        self.lost = 0  # events lost to a full backlog or the kernel's rate limit

    def start(self) -> None:
        if self._reader is None:
            return
        skipped = self._reader.skip()  # written while no agent read: stale by now
        if skipped:
            log.debug("drop stream: skipped %d records from before this agent", skipped)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._reader.fileno(), self._on_readable)
        self._task = asyncio.create_task(self._pump(), name="drop-monitor")

    async def close(self) -> None:
        if self._loop is not None and self._reader is not None:
            self._loop.remove_reader(self._reader.fileno())
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _on_readable(self) -> None:
        """Runs in the loop whenever the ring has records: consume them all now.

        (The fd stays readable until the consumer position catches up, so
        this must read, not just schedule a read, or the loop would spin.)
        """
        assert self._reader is not None
        try:
            events = self._reader.read()
        except Exception:  # never let a bad record take the loop down
            log.exception("drop stream: reading the ring buffer failed")
            return
        for e in events:
            if len(self._backlog) >= _BACKLOG:
                self.lost += 1 + e.suppressed
                continue
            self._backlog.append(e)
        if events:
            self._wake.set()

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._backlog:
                await self.handle(self._backlog.popleft())

    async def handle(self, event: DropEvent) -> None:
        """Resolve one record's pod and hand it to every matching subscriber."""
        if event.suppressed:
            self.lost += event.suppressed
            self._publish(lost_event(event.suppressed, "rate limit in the kernel"))
        if not self._subs:
            return  # nobody listens: resolving the pod would be wasted work
        pod = await self._pod(event.ifindex)
        self._publish(drop_event_dict(event, pod))

    async def _pod(self, ifindex: int) -> Mapping[str, Any] | None:
        now = time.monotonic()
        index = self._pods
        if ifindex not in index.by_ifindex and now - index.at > _POD_INDEX_TTL:
            try:
                rows = await self._read_pods()
            except Exception as exc:  # the event still goes out, without its pod
                log.debug("drop stream: cannot read pods: %s", exc)
                rows = []
            by_ifindex: dict[int, Mapping[str, Any]] = {}
            for row in rows:
                idx = row.get("ifindex")
                if isinstance(idx, int) and idx not in by_ifindex:
                    by_ifindex[idx] = row
            self._pods = index = _PodIndex(by_ifindex, now)
        return index.by_ifindex.get(ifindex)

    def _publish(self, doc: dict[str, Any]) -> None:
        if doc.get("type") == "drop":
            self.events += 1
        for sub in list(self._subs):
            if not sub.filter.matches(doc):
                continue
            try:
                sub.queue.put_nowait(doc)
            except asyncio.QueueFull:
                sub.missed += 1

    async def subscribe(self, query: Mapping[str, str]) -> AsyncGenerator[dict[str, Any]]:
        """Events from now on, until the caller stops iterating."""
        if self._fallback:
            async for e in follow_drops(self._read_pods, heartbeat=self._heartbeat):
                yield e
            return
        sub = _Subscriber(DropFilter.from_query(query), asyncio.Queue(self._queue_size))
        self._subs.add(sub)
        try:
            yield {"type": "subscribed", "time": _iso(time.time()), "source": "ring buffer"}
            while True:
                try:
                    doc = await asyncio.wait_for(sub.queue.get(), self._heartbeat)
                except TimeoutError:
                    yield {"type": "heartbeat"}
                    continue
                yield doc
                # Told once it has caught up, after what it did receive.
                if sub.missed and sub.queue.empty():
                    missed, sub.missed = sub.missed, 0
                    yield lost_event(missed, "this reader was too slow")
        finally:
            self._subs.discard(sub)

    @classmethod
    def for_pins(cls, layout: PinLayout, read_pods: ReadPods) -> DropMonitor:
        """Reads the ring pinned under ``layout``; the counter fallback when it cannot."""
        try:
            reader: DropEventReader | None = DropEventReader.open(layout)
        except VeilError as exc:
            log.warning(
                "drop stream without packet tuples (per-pod counters only): %s (%s)",
                exc.message,
                exc.hint,
            )
            reader = None
        return cls(reader, read_pods)
