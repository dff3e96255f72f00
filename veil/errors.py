"""The root of Veil's error hierarchy, shared by every room.

Each room defines one family below :class:`VeilError` (``ControllerError``,
``NodeError``, ``AgentError``, ``ZtunnelError``, ``LabError``). Every message a
user can see says what was wrong, what was expected, and what to do next;
``hint`` carries the last part so CLIs can print it on its own line.
"""

from __future__ import annotations

__all__ = ["VeilError"]


class VeilError(Exception):
    """Base class of every error Veil raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message
