"""Discovery: streams the registry and the trust bundle to every node.

:class:`DiscoveryHub` implements :class:`controller.service.DiscoveryBackend`
(snapshot then deltas, resume by epoch and version, per-watcher coalescing).
"""

from .diff import Change, Key, diff_resources, index_state
from .hub import DEFAULT_MAX_TOMBSTONES, DiscoveryHub, HubSubscription, WatcherInfo

__all__ = [
    "DEFAULT_MAX_TOMBSTONES",
    "Change",
    "DiscoveryHub",
    "HubSubscription",
    "Key",
    "WatcherInfo",
    "diff_resources",
    "index_state",
]
