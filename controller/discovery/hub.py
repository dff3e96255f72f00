"""The Discovery hub: one versioned resource set, fanned out to every watching node.

Semantics of the stream (``Discovery.Watch``):

* **Snapshot, then deltas.** A new watcher first gets the complete state of the
  types it asked for (``snapshot=True``), then only upserts and removals, each
  message with a higher version.
* **Resume.** Versions count changes within one *epoch* (one controller
  process). The hub remembers, per key, the version of its last change, and
  tombstones for removed keys up to a bounded number. A node that reconnects with
  the epoch and version it last applied gets only what changed since; a foreign
  epoch, or a version older than the tombstone horizon, gets a fresh snapshot.
* **Trust bundle on the stream.** It rides in every snapshot and in the next
  message after :meth:`DiscoveryHub.set_trust_bundle` changes it, whatever types
  the watcher selected.
* **Coalescing.** Each watcher has a pending map keyed by (type, key) holding
  only the latest upsert or removal. Publishing writes into these maps and
  never waits for a watcher, so a slow node neither blocks the publisher nor
  other nodes; its memory is bounded by the number of resources, and when it
  reads again it gets the latest state in one message.

All methods run on the controller's event loop; nothing here does IO.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from controller.api.errors import ApiError
from controller.api.model import (
    RegistryState,
    Resource,
    ResourceType,
    TrustBundle,
    WatchUpdate,
    resource_type,
)

from .diff import Change, Key, diff_resources, index_state

__all__ = [
    "DEFAULT_CONCURRENT_SNAPSHOTS",
    "DEFAULT_MAX_TOMBSTONES",
    "DiscoveryHub",
    "HubSubscription",
    "WatcherInfo",
]

log = logging.getLogger("veil.controller.discovery")

# Removed keys remembered for resumption. Beyond this many, the oldest are
# forgotten and nodes that fell further behind get a snapshot instead.
DEFAULT_MAX_TOMBSTONES = 100_000
# Snapshots being written at the same time (each is the whole registry).
DEFAULT_CONCURRENT_SNAPSHOTS = 4


@dataclass(frozen=True, slots=True)
class WatcherInfo:
    """One connected node, for status pages and logs."""

    node: str
    types: frozenset[ResourceType]
    pending: int  # coalesced changes not yet sent
    sent_version: int  # version of the last message handed to the stream


class HubSubscription:
    """One node's view of the hub; implements controller.service.Subscription."""

    def __init__(
        self, hub: DiscoveryHub, node: str, types: frozenset[ResourceType], first: WatchUpdate
    ) -> None:
        self.node = node
        self.types = types
        self._hub = hub
        self._first: WatchUpdate | None = first
        self._pending: dict[Key, Resource | None] = {}
        self._bundle_pending = False
        self._wake = asyncio.Event()
        self._closed = False
        self._slot: asyncio.TimerHandle | None = None  # held while the snapshot is sent
        self.sent_version = 0

    def offer(self, changes: Iterable[Change]) -> None:
        """Merges changes into the pending map; only the latest per key is kept."""
        types = self.types
        pending = self._pending
        touched = False
        for key, resource in changes:
            if key[0] in types:
                pending[key] = resource
                touched = True
        if touched:
            self._wake.set()

    def offer_bundle(self) -> None:
        self._bundle_pending = True
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending) + (1 if self._bundle_pending else 0)

    def _drain(self) -> WatchUpdate | None:
        if not self._pending and not self._bundle_pending:
            return None
        items = sorted(self._pending.items(), key=lambda kv: kv[0])
        self._pending = {}
        bundle = self._hub.trust_bundle if self._bundle_pending else None
        self._bundle_pending = False
        return WatchUpdate(
            epoch=self._hub.epoch,
            # Everything published so far is either in this message or was
            # filtered out by type, so the node is current as of this version.
            version=self._hub.version,
            snapshot=False,
            upserts=tuple(r for _, r in items if r is not None),
            removals=tuple(k for k, r in items if r is None),
            trust_bundle=bundle,
        )

    async def next(self) -> WatchUpdate:
        """The first message (snapshot or resume delta), then coalesced deltas."""
        self._release_slot()
        if self._first is not None:
            if self._first.snapshot:
                await self._take_slot()
            first, self._first = self._first, None
            self.sent_version = first.version
            return first
        while True:
            if self._closed:
                raise ApiError(
                    "UNAVAILABLE",
                    "the controller is shutting down",
                    hint="the node reconnects and resumes",
                )
            update = self._drain()
            if update is not None:
                self.sent_version = update.version
                return update
            self._wake.clear()
            await self._wake.wait()

    async def _take_slot(self) -> None:
        # A snapshot is converted to protobuf and serialized by the gRPC layer
        # after next() returns: megabytes per node for a large mesh. Fifty nodes
        # reconnecting at once (a controller restart) would hold all of them at
        # the same time, so only a few snapshots are in flight; the slot is
        # given back when the stream asks for the next message, i.e. once the
        # snapshot is written, or after a deadline, so a node that never reads
        # cannot hold it.
        gate = self._hub._snapshot_slots
        await gate.acquire()
        self._slot = asyncio.get_running_loop().call_later(
            self._hub.snapshot_slot_seconds, self._release_slot
        )

    def _release_slot(self) -> None:
        if self._slot is not None:
            self._slot.cancel()
            self._slot = None
            self._hub._snapshot_slots.release()

    def close(self) -> None:
        """Stops delivery and forgets this watcher (idempotent)."""
        self._release_slot()
        if not self._closed:
            self._closed = True
            self._pending = {}
            self._hub._remove(self)
            self._wake.set()


class DiscoveryHub:
    """Implements controller.service.DiscoveryBackend over published states."""

    def __init__(
        self,
        *,
        epoch: str | None = None,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES,
        concurrent_snapshots: int = DEFAULT_CONCURRENT_SNAPSHOTS,
        snapshot_slot_seconds: float = 30.0,
    ) -> None:
        self.epoch = epoch or secrets.token_hex(8)
        self._snapshot_slots = asyncio.Semaphore(concurrent_snapshots)
        self.snapshot_slot_seconds = snapshot_slot_seconds
        self._max_tombstones = max_tombstones
        self._version = 0
        self._state = RegistryState()
        self._resources: dict[Key, Resource] = {}
        # Key -> version of its last upsert, oldest first (moved to the end on
        # change), so a resume walks back only over what changed since.
        self._modified: OrderedDict[Key, int] = OrderedDict()
        self._tombstones: OrderedDict[Key, int] = OrderedDict()
        # A resume from a version below this may have missed a forgotten removal.
        self._horizon = 0
        self._bundle: TrustBundle | None = None
        self._bundle_version = 0
        self._watchers: set[HubSubscription] = set()

    @property
    def version(self) -> int:
        return self._version

    @property
    def trust_bundle(self) -> TrustBundle | None:
        return self._bundle

    def watchers(self) -> list[WatcherInfo]:
        return sorted(
            (WatcherInfo(w.node, w.types, w.pending, w.sent_version) for w in self._watchers),
            key=lambda i: i.node,
        )

    # -- publishing -------------------------------------------------------

    def publish(self, state: RegistryState) -> int:
        """Makes ``state`` the served state; returns the number of changed resources."""
        new = index_state(state)
        changes = diff_resources(self._resources, new)
        self._state = state
        if not changes:
            self._resources = new
            return 0
        self._version += 1
        version = self._version
        for key, resource in changes:
            if resource is not None:
                self._modified[key] = version
                self._modified.move_to_end(key)
                self._tombstones.pop(key, None)
            else:
                self._modified.pop(key, None)
                self._tombstones.pop(key, None)
                self._tombstones[key] = version
        while len(self._tombstones) > self._max_tombstones:
            _, forgotten = self._tombstones.popitem(last=False)
            self._horizon = max(self._horizon, forgotten)
        self._resources = new
        for watcher in self._watchers:
            watcher.offer(changes)
        log.debug(
            "published version %d: %d changes to %d watchers",
            version,
            len(changes),
            len(self._watchers),
        )
        return len(changes)

    def set_trust_bundle(self, bundle: TrustBundle) -> None:
        """Serves ``bundle`` from now on and sends it to every watcher if it changed."""
        if bundle == self._bundle:
            return
        self._bundle = bundle
        self._version += 1
        self._bundle_version = self._version
        for watcher in self._watchers:
            watcher.offer_bundle()
        log.info(
            "trust bundle for %s now has %d root(s); sent to %d watchers",
            bundle.trust_domain,
            len(bundle.roots),
            len(self._watchers),
        )

    # -- subscribing ------------------------------------------------------

    def subscribe(
        self, node: str, types: frozenset[ResourceType], epoch: str, version: int
    ) -> HubSubscription:
        """A new watcher; its first message is a snapshot or, if possible, a resume delta."""
        types = types or frozenset(ResourceType)
        first = self._resume(types, version) if self._can_resume(epoch, version) else None
        if first is None:
            first = self._snapshot(types)
        sub = HubSubscription(self, node, types, first)
        self._watchers.add(sub)
        log.info(
            "node %s watching %s from %s (%d watchers)",
            node,
            ",".join(t.name for t in sorted(types)),
            "snapshot" if first.snapshot else f"version {version}",
            len(self._watchers),
        )
        return sub

    def _can_resume(self, epoch: str, version: int) -> bool:
        return epoch == self.epoch and 0 < version <= self._version and version >= self._horizon

    def _snapshot(self, types: frozenset[ResourceType]) -> WatchUpdate:
        return WatchUpdate(
            epoch=self.epoch,
            version=self._version,
            snapshot=True,
            upserts=tuple(r for r in self._state.resources() if resource_type(r) in types),
            trust_bundle=self._bundle,
        )

    def _resume(self, types: frozenset[ResourceType], since: int) -> WatchUpdate:
        upserts: list[tuple[Key, Resource]] = []
        for key, v in reversed(self._modified.items()):
            if v <= since:
                break
            if key[0] in types:
                upserts.append((key, self._resources[key]))
        removals: list[Key] = []
        for key, v in reversed(self._tombstones.items()):
            if v <= since:
                break
            if key[0] in types:
                removals.append(key)
        upserts.sort(key=lambda kv: kv[0])
        removals.sort()
        return WatchUpdate(
            epoch=self.epoch,
            version=self._version,
            snapshot=False,
            upserts=tuple(r for _, r in upserts),
            removals=tuple(removals),
            trust_bundle=self._bundle if self._bundle_version > since else None,
        )

    def _remove(self, sub: HubSubscription) -> None:
        if sub in self._watchers:
            self._watchers.discard(sub)
            log.info("node %s stopped watching (%d watchers)", sub.node, len(self._watchers))

    def close(self) -> None:
        """Ends every subscription (controller shutdown); their next() raises UNAVAILABLE."""
        for sub in list(self._watchers):
            sub.close()
