"""The ztunnel room's error family.

Every error the ztunnel raises on purpose derives from :class:`ZtunnelError`
(itself a :class:`~veil.errors.VeilError`), so the CLI can print the
message and hint of any of them the same way. Subpackages add subclasses here
or in their own package (``ztunnel.hbone`` and ``ztunnel.tls`` do the latter).
"""

from __future__ import annotations

from veil.errors import VeilError

__all__ = [
    "AdminBindError",
    "CertificateError",
    "ConfigError",
    "ZtunnelError",
]


class ZtunnelError(VeilError):
    """Base of every error the ztunnel raises on purpose."""


class ConfigError(ZtunnelError):
    """A flag or ``VEIL_*`` environment variable has an invalid value."""


class CertificateError(ZtunnelError):
    """A workload certificate could not be obtained, or the controller's answer
    failed the node's own checks (wrong SAN, does not chain to the trust bundle)."""


class AdminBindError(ZtunnelError):
    """An operations endpoint was asked to listen where it must not (the admin
    API on a non-loopback address)."""
