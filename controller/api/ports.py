"""Where nodes reach the controller: part of the contract every node imports."""

from __future__ import annotations

from typing import Final

__all__ = ["CONTROLLER_HEALTH_PORT", "CONTROLLER_JOIN_PORT", "CONTROLLER_PORT"]

CONTROLLER_PORT: Final = 15012
CONTROLLER_JOIN_PORT: Final = 15013
# HTTP health, version and metrics (loopback unless --health-addr says otherwise).
CONTROLLER_HEALTH_PORT: Final = 15014
