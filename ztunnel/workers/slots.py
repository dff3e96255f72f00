"""What the supervisor holds per worker slot, and the store that feeds the workers.

:class:`ForwardingStore` is the supervisor's :class:`~node.state.StateStore`:
every update it applies is also handed on (the workers apply the same
sequence), and :meth:`ForwardingStore.full_update` gives a newly started
worker the whole current state as one snapshot. :class:`WorkerHandle` is one
worker slot: the process in it changes when it is restarted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.api.model import WatchUpdate
from controller.api.spiffe import SpiffeId
from node.state import StateChange, StateStore

from ..metrics.aggregate import ExportedFamily
from .link import FrameLink

__all__ = ["ForwardingStore", "WorkerHandle"]


class ForwardingStore(StateStore):
    """A state store that hands every applied update to the workers."""

    def __init__(self, node: str, trust_domain: str, forward: Callable[[WatchUpdate], None]):
        super().__init__(node, trust_domain)
        self._forward = forward

    def apply(self, update: WatchUpdate) -> StateChange | None:
        change = super().apply(update)
        if change is not None:
            self._forward(update)
        return change

    def full_update(self) -> WatchUpdate | None:
        # Reads the base class's resources: the one place that holds them.
        """The whole current state as one snapshot update (None before sync)."""
        snap = self.current
        if not snap.synced:
            return None
        return WatchUpdate(
            epoch=snap.epoch,
            version=snap.version,
            snapshot=True,
            upserts=tuple(self._resources.values()),
            trust_bundle=snap.trust_bundle,
        )


@dataclass(eq=False)
class WorkerHandle:
    """The supervisor's view of one worker slot (the process in it changes)."""

    index: int
    process: asyncio.subprocess.Process | None = None
    link: FrameLink | None = None
    pid: int = 0
    ready: bool = False
    started_at: float = 0.0
    crash_streak: int = 0
    restarts: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    sent: dict[SpiffeId, int] = field(default_factory=dict)  # identity -> serial pushed
    pending: dict[int, asyncio.Future[object]] = field(default_factory=dict)
    last_metrics: list[ExportedFamily] = field(default_factory=list)
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
