"""The node room's error family, shared by every node process.

The agent, the ztunnel and the waypoint raise these for node credentials and for
the control-plane state they hold; each message says what to do next.
"""

from __future__ import annotations

from veil.errors import VeilError

__all__ = ["NodeCredentialsError", "NodeError", "StateError"]


class NodeError(VeilError):
    """Root of the node room's errors."""


class NodeCredentialsError(NodeError):
    """A node's local credentials (key, certificate, trust bundle) are missing or bad."""


class StateError(NodeError):
    """The control-plane state could not be applied (for example a delta whose
    version does not follow the one held)."""
