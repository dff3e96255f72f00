"""The lab's error family: everything the network-namespace lab raises on purpose."""

from __future__ import annotations

from veil.errors import VeilError

__all__ = ["LabError"]


class LabError(VeilError):
    """Building, driving or tearing down a lab topology failed."""
