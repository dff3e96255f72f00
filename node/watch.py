"""A node's Discovery watch: keeps the state store in step with the controller.

:class:`WatchClient` runs one ``Discovery.Watch`` stream at a time and applies
every update to the :class:`~node.state.StateStore`. When the stream fails
(controller restarting, network partition) the store keeps serving the last
snapshot, and the client reconnects after a capped, jittered exponential
backoff, resuming from the last applied epoch and version so the controller
can answer with a delta instead of a full snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from controller.api.errors import ApiError
from controller.api.model import ResourceType, WatchUpdate
from node.errors import StateError
from node.state.store import StateStore

from .backoff import Backoff

__all__ = ["WatchClient", "WatchSource", "WatchStatus"]

log = logging.getLogger("veil.node.watch")


class WatchSource(Protocol):
    """What the watch needs from the controller (``ControllerClient`` satisfies it)."""

    def watch(
        self,
        node: str = "",
        types: Iterable[ResourceType] = (),
        epoch: str = "",
        version: int = 0,
    ) -> AsyncIterator[WatchUpdate]: ...


@dataclass(frozen=True, slots=True)
class WatchStatus:
    """The watch's health, for ``/config_dump`` and logs."""

    connected: bool
    epoch: str
    version: int
    updates: int  # updates applied since start
    reconnects: int  # streams started after the first
    last_update_at: float | None  # wall-clock seconds
    last_error: str | None
    last_error_at: float | None

    def to_json(self) -> dict[str, object]:
        return {
            "connected": self.connected,
            "epoch": self.epoch,
            "version": self.version,
            "updates": self.updates,
            "reconnects": self.reconnects,
            "last_update_at": self.last_update_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


class WatchClient:
    """Watches the controller for one node until cancelled."""

    def __init__(
        self,
        source: WatchSource,
        store: StateStore,
        *,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._store = store
        self._backoff = backoff if backoff is not None else Backoff(0.5, 30.0)
        self._sleep = sleep
        self._clock = clock
        self._connected = False
        self._streams = 0
        self._updates = 0
        self._last_update_at: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None

    def status(self) -> WatchStatus:
        snap = self._store.current
        return WatchStatus(
            connected=self._connected,
            epoch=snap.epoch,
            version=snap.version,
            updates=self._updates,
            reconnects=max(0, self._streams - 1),
            last_update_at=self._last_update_at,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
        )

    async def run(self) -> None:
        """Watches forever; returns only by cancellation."""
        while True:
            await self.run_once()
            delay = self._backoff.next()
            log.warning(
                "controller watch down (%s); serving the last state (version %d), retrying in %.1fs",
                self._last_error,
                self._store.current.version,
                delay,
            )
            await self._sleep(delay)

    async def run_once(self) -> None:
        """One stream: connect, apply updates until it ends or fails.

        Never raises for controller or stream failures; records them instead.
        """
        epoch, version = self._store.resume_point()
        self._streams += 1
        received = False
        try:
            stream = self._source.watch(self._store.node, (), epoch, version)
            async for update in stream:
                if not received:
                    received = True
                    self._connected = True
                    self._backoff.reset()
                    log.info(
                        "controller watch connected (resumed from %s/%d, got %s version %d)",
                        epoch or "-",
                        version,
                        "snapshot" if update.snapshot else "delta",
                        update.version,
                    )
                try:
                    self._store.apply(update)
                except StateError as e:
                    # The stream no longer fits what we hold: start over with a
                    # snapshot, keep serving the current state meanwhile.
                    self._store.invalidate_resume()
                    self._fail(str(e))
                    return
                self._updates += 1
                self._last_update_at = self._clock()
            self._fail("the controller closed the watch stream")
        except ApiError as e:
            self._fail(str(e))
        except Exception as e:
            # Whatever broke (a malformed message, a transport bug), the node
            # must keep serving and retry; the traceback goes to the log.
            log.exception("controller watch failed unexpectedly")
            self._fail(f"{type(e).__name__}: {e}")
        finally:
            self._connected = False

    def _fail(self, reason: str) -> None:
        self._last_error = reason
        self._last_error_at = self._clock()
