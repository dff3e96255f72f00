"""The agent's drop stream for ``veilctl monitor --type drop``.

The BPF programs count every drop per pod and reason in the pinned per-CPU
``counters`` map (the same numbers ``/metrics`` and ``veilctl pods`` show).
This module turns successive reads of those counters into events: each poll
that finds a pod's count for a reason grown emits one ``drop`` event with the
pod, its veth and address, the reason and how many packets were dropped since
the previous poll. Reading counters costs the data path nothing and cannot
lose a drop; what it cannot give is each packet's 4-tuple.

:func:`drop_deltas` is the pure part (tested with canned rows);
:func:`follow_drops` polls and yields.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = ["DropCounts", "drop_deltas", "follow_drops"]

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
