"""Control-plane state of one ztunnel: the store, its immutable snapshots, and routing.

Only this package owns mutable shared data (:class:`StateStore`); everything
else reads immutable :class:`Snapshot` objects.
"""

from .route import (
    EndpointChooser,
    Hbone,
    Passthrough,
    Refuse,
    RoundRobin,
    Route,
    SameNode,
    first_endpoint,
    random_chooser,
    route,
)
from .snapshot import Snapshot, build_snapshot, empty_snapshot, normalize_ip
from .store import StateChange, StateStore, Subscriber

__all__ = [
    "EndpointChooser",
    "Hbone",
    "Passthrough",
    "Refuse",
    "RoundRobin",
    "Route",
    "SameNode",
    "Snapshot",
    "StateChange",
    "StateStore",
    "Subscriber",
    "build_snapshot",
    "empty_snapshot",
    "first_endpoint",
    "normalize_ip",
    "random_chooser",
    "route",
]
