"""Errors the ztunnel's proxy raises on purpose (all under :class:`ZtunnelError`)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ztunnel.errors import ZtunnelError

if TYPE_CHECKING:
    from .sockets import Address

__all__ = [
    "FLAG_DOWNSTREAM_CLOSED",
    "FLAG_NO_ROUTE",
    "FLAG_POLICY_DENIED",
    "FLAG_UPSTREAM_CLOSED",
    "FLAG_UPSTREAM_FAILURE",
    "ListenerError",
    "NoRouteError",
    "ProxyError",
    "TunnelError",
    "UpstreamConnectError",
]

# Response flags (Envoy/Istio short names) on metrics and access log lines.
FLAG_POLICY_DENIED = "RBAC"  # refused or closed by authorization / peer authentication
FLAG_UPSTREAM_FAILURE = "UF"  # could not connect to the destination or the peer ztunnel
FLAG_NO_ROUTE = "NR"  # no usable route (unknown source, no endpoints, no certificate)
FLAG_DOWNSTREAM_CLOSED = "DC"  # closed by the ztunnel itself (shutdown, drain deadline)
FLAG_UPSTREAM_CLOSED = "UC"  # the HBONE peer reset the stream or its connection was lost


class ProxyError(ZtunnelError):
    """Base of the proxy's errors. ``flags`` is the response flag a connection
    that failed this way carries in metrics and the access log."""

    flags = "-"


class NoRouteError(ProxyError):
    """The ztunnel cannot carry a connection it accepted (for example no
    certificate for the source workload yet)."""

    flags = FLAG_NO_ROUTE


class ListenerError(ProxyError):
    """A listener socket could not be opened."""

    def __init__(self, name: str, host: str, port: int, err: OSError) -> None:
        if err.errno == errno.EADDRINUSE:
            hint = (
                f"another process listens on {host}:{port}; stop it (ss -ltnp 'sport = :{port}') "
                "or give this ztunnel other ports"
            )
        elif err.errno in (errno.EPERM, errno.EACCES):
            hint = "the steered listeners need CAP_NET_ADMIN for IP_TRANSPARENT; run as root"
        elif err.errno == errno.EADDRNOTAVAIL:
            hint = f"{host} is not an address of this network namespace; use 0.0.0.0 or a local IP"
        else:
            hint = "check the listen address and the process's capabilities"
        super().__init__(f"cannot listen for {name} on {host}:{port}: {err.strerror}", hint=hint)
        self.errno = err.errno


class UpstreamConnectError(ProxyError):
    """The ztunnel could not connect to a destination (pod, peer ztunnel, passthrough)."""

    flags = FLAG_UPSTREAM_FAILURE

    def __init__(self, dst: Address, err: OSError, *, bind_ip: str | None = None) -> None:
        source = f" from {bind_ip}" if bind_ip else ""
        reason = err.strerror or str(err)
        super().__init__(
            f"connect to {dst}{source} failed: {reason}",
            hint="check that the destination listens on that port and that routing to it works",
        )
        self.errno = err.errno
        self.dst = dst


class TunnelError(ProxyError):
    """An HBONE tunnel to the destination's ztunnel could not be opened.

    ``status`` is the peer's answer to the CONNECT when there was one (401:
    its policy denied us), None when the connection itself failed."""

    def __init__(self, message: str, *, hint: str | None, status: int | None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.flags = FLAG_POLICY_DENIED if status == 401 else FLAG_UPSTREAM_FAILURE
