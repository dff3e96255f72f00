"""The controller room's error family.

Every error the controller raises on purpose derives from :class:`ControllerError`
(itself a :class:`veil.errors.VeilError`), so the ``veil`` CLI can print
``message`` and ``hint`` and exit non-zero without a traceback. Errors that cross
the gRPC boundary are :class:`controller.api.errors.ApiError` instead, because they
carry a status code the client acts on.
"""

from __future__ import annotations

from controller.api.token import TokenError
from veil.errors import VeilError

__all__ = ["CaError", "ControllerError", "TokenError"]


class ControllerError(VeilError):
    """Root of the controller room's errors."""


class CaError(ControllerError):
    """The CA material is missing, unreadable, inconsistent or unusable."""
