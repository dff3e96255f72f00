"""Where nodes reach the controller: part of the contract every node imports."""

from __future__ import annotations

from typing import Final

__all__ = ["CONTROLLER_JOIN_PORT", "CONTROLLER_PORT"]

CONTROLLER_PORT: Final = 15012
CONTROLLER_JOIN_PORT: Final = 15013
