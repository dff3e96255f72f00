"""A node's control-plane state: the store and its immutable snapshots.

Only this package owns mutable shared data (:class:`StateStore`); every node
process (agent, ztunnel, waypoint) reads immutable :class:`Snapshot` objects.
"""

from .snapshot import Snapshot, build_snapshot, empty_snapshot, normalize_ip
from .store import StateChange, StateStore, Subscriber

__all__ = [
    "Snapshot",
    "StateChange",
    "StateStore",
    "Subscriber",
    "build_snapshot",
    "empty_snapshot",
    "normalize_ip",
]
