"""The root of Veil's error hierarchy, shared by every room.

Each room defines one family below :class:`VeilError` (``ControllerError``,
``AgentError``, ``ZtunnelError``). Every message a user can see says what was
wrong, what was expected, and what to do next; ``hint`` carries the last part so
CLIs can print it on its own line.
"""

from __future__ import annotations

__all__ = ["ApiError", "VeilError"]


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


class ApiError(VeilError):
    """A controller RPC failed. ``code`` is the gRPC status name, e.g. PERMISSION_DENIED."""

    def __init__(self, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {super().__str__()}"
