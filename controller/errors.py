"""The controller room's error family.

Every error the controller raises on purpose derives from :class:`ControllerError`
(itself a :class:`controller.api.errors.VeilError`), so the ``veil`` CLI can print
``message`` and ``hint`` and exit non-zero without a traceback. Errors that cross
the gRPC boundary are :class:`controller.api.errors.ApiError` instead, because they
carry a status code the client acts on.
"""

from __future__ import annotations

from controller.api.errors import VeilError

__all__ = ["CaError", "ControllerError", "NodeCredentialsError", "TokenError"]


class ControllerError(VeilError):
    """Root of the controller room's errors."""


class CaError(ControllerError):
    """The CA material is missing, unreadable, inconsistent or unusable."""


class TokenError(ControllerError):
    """A join token could not be created, parsed or stored."""


class NodeCredentialsError(ControllerError):
    """A node's local credentials (key, certificate, trust bundle) are missing or bad."""
