"""The ztunnel's control-plane clients: the Discovery watch and the retry policy.

Wire types never reach this package: :mod:`controller.api.client` converts
them to :mod:`controller.api.model` values.
"""

from .backoff import Backoff
from .watch import WatchClient, WatchSource, WatchStatus

__all__ = ["Backoff", "WatchClient", "WatchSource", "WatchStatus"]
