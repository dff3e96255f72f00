"""The waypoint's error family: what was wrong and what to do next."""

from __future__ import annotations

from veil.errors import VeilError

__all__ = ["WaypointConfigError", "WaypointError"]


class WaypointError(VeilError):
    """Base of every error the waypoint raises to its operator."""


class WaypointConfigError(WaypointError):
    """A setting that does not parse or does not make sense."""
