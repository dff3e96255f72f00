"""The one place in the ztunnel that owns mutable control-plane state.

:class:`StateStore` keeps the resources the controller sent, applies each
:class:`~controller.api.model.WatchUpdate` (a snapshot replaces everything, a
delta upserts and removes), builds the next immutable
:class:`~node.state.snapshot.Snapshot` outside the lock and swaps it in
under it. Readers take ``store.current`` and keep using that object for the
whole decision. Subscribers hear about every change after the swap: the proxy
re-checks live connections, the certificate manager prefetches for new local
workloads.

When the controller is unreachable nothing is cleared: the store keeps serving
the last snapshot, and the watch client resumes from :meth:`resume_point`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from controller.api.model import Resource, ResourceType, WatchUpdate, resource_key
from controller.api.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from node.errors import StateError

from .snapshot import Snapshot, build_snapshot, empty_snapshot

__all__ = ["StateChange", "StateStore", "Subscriber"]

log = logging.getLogger("veil.node.state")


@dataclass(frozen=True, slots=True)
class StateChange:
    """What one applied update changed, handed to subscribers after the swap."""

    old: Snapshot
    new: Snapshot
    changed: frozenset[tuple[ResourceType, str]]  # upserted with a new value, or removed
    trust_bundle_changed: bool

    def changed_types(self) -> frozenset[ResourceType]:
        return frozenset(t for t, _ in self.changed)

    @property
    def added_local_identities(self) -> frozenset[SpiffeId]:
        return self.new.local_identities() - self.old.local_identities()

    @property
    def removed_local_identities(self) -> frozenset[SpiffeId]:
        return self.old.local_identities() - self.new.local_identities()

    @property
    def affects_authorization(self) -> bool:
        """True when a live connection's verdict may differ under the new snapshot.

        Policies, peer authentication and workloads (labels decide which policy
        applies, IPs decide who a peer is) all feed the decision.
        """
        return bool(
            self.changed_types()
            & {
                ResourceType.AUTHORIZATION_POLICY,
                ResourceType.PEER_AUTHENTICATION,
                ResourceType.WORKLOAD,
            }
        )


Subscriber = Callable[[StateChange], None]


class StateStore:
    """Holds the current snapshot for one node and applies watch updates.

    ``apply`` is meant to be called from the event loop (the watch client);
    ``current`` may be read from any thread.
    """

    def __init__(self, node: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self._node = node
        self._lock = threading.Lock()
        self._resources: dict[tuple[ResourceType, str], Resource] = {}
        self._snapshot = empty_snapshot(node, trust_domain)
        self._subscribers: list[Subscriber] = []
        self._synced = asyncio.Event()
        # Set when the controller asked us to start over (epoch mismatch): the
        # next watch sends epoch "" so it gets a snapshot.
        self._resume_valid = True

    @property
    def node(self) -> str:
        return self._node

    @property
    def current(self) -> Snapshot:
        return self._snapshot

    def resume_point(self) -> tuple[str, int]:
        """``(epoch, version)`` to send on the next watch; ``("", 0)`` asks for a snapshot."""
        snap = self._snapshot
        if not snap.synced or not self._resume_valid:
            return "", 0
        return snap.epoch, snap.version

    def invalidate_resume(self) -> None:
        """Forget the resume point (the state is kept and still served)."""
        self._resume_valid = False

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Registers ``subscriber``; returns a function that unregisters it."""
        with self._lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._lock:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe

    async def wait_synced(self, timeout: float | None = None) -> Snapshot:
        """Waits for the first snapshot from the controller."""
        await asyncio.wait_for(self._synced.wait(), timeout)
        return self._snapshot

    def apply(self, update: WatchUpdate) -> StateChange | None:
        """Applies one update; returns what changed, or None for a stale duplicate.

        Raises :class:`~ztunnel.errors.StateError` for a delta that does not fit
        the state held (no snapshot yet, or another epoch); the caller should
        re-watch from scratch. The held state is untouched in that case.
        """
        old = self._snapshot
        if update.snapshot:
            resources: dict[tuple[ResourceType, str], Resource] = {
                resource_key(r): r for r in update.upserts
            }
            changed = self._diff(self._resources, resources)
        else:
            if not old.synced:
                raise StateError(
                    f"controller sent a delta (version {update.version}) before any snapshot",
                    hint="the watch is restarted to get a full snapshot",
                )
            if update.epoch != old.epoch:
                raise StateError(
                    f"controller sent a delta for epoch {update.epoch!r} while this node holds "
                    f"epoch {old.epoch!r}",
                    hint="the watch is restarted to get a full snapshot",
                )
            if update.version <= old.version:
                log.debug("ignoring update version %d (holding %d)", update.version, old.version)
                return None
            resources = dict(self._resources)
            changed_keys: set[tuple[ResourceType, str]] = set()
            for r in update.upserts:
                k = resource_key(r)
                if resources.get(k) != r:
                    changed_keys.add(k)
                resources[k] = r
            for k in update.removals:
                if resources.pop(k, None) is not None:
                    changed_keys.add(k)
            changed = frozenset(changed_keys)
        bundle = update.trust_bundle if update.trust_bundle is not None else old.trust_bundle
        new = build_snapshot(
            self._node,
            resources.values(),
            epoch=update.epoch,
            version=update.version,
            trust_bundle=bundle,
            trust_domain=old.trust_domain,
            previous=old,
        )
        with self._lock:
            self._resources = resources
            self._snapshot = new
            self._resume_valid = True
            subscribers = list(self._subscribers)
        self._synced.set()
        change = StateChange(
            old=old, new=new, changed=changed, trust_bundle_changed=bundle != old.trust_bundle
        )
        log.info(
            "applied %s epoch=%s version=%d: %d workloads, %d services, %d policies, %d changed",
            "snapshot" if update.snapshot else "delta",
            update.epoch,
            update.version,
            len(new.workloads),
            len(new.services),
            len(new.policies),
            len(changed),
        )
        for sub in subscribers:
            try:
                sub(change)
            except Exception:
                # One broken subscriber must not stop the others or the watch.
                log.exception("state subscriber %r failed", sub)
        return change

    @staticmethod
    def _diff(
        old: dict[tuple[ResourceType, str], Resource], new: dict[tuple[ResourceType, str], Resource]
    ) -> frozenset[tuple[ResourceType, str]]:
        out = {k for k, v in new.items() if old.get(k) != v}
        out.update(k for k in old if k not in new)
        return frozenset(out)
