"""Errors that cross the controller's gRPC boundary.

:class:`ApiError` carries the gRPC status name a client acts on. The root of the
hierarchy, :class:`veil.errors.VeilError`, lives in the project foundation.
"""

from __future__ import annotations

from veil.errors import VeilError

__all__ = ["ApiError"]


class ApiError(VeilError):
    """A controller RPC failed. ``code`` is the gRPC status name, e.g. PERMISSION_DENIED."""

    def __init__(self, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {super().__str__()}"
