"""Socket construction for the ztunnel's listeners and upstream connections.

Owns every ``setsockopt`` the data path needs, so the listener modules never
touch raw option numbers:

* listeners bind ``0.0.0.0:PORT`` (or a configured address) with
  ``IP_TRANSPARENT``, which lets steered packets whose destination is not a
  local address (TPROXY or ``bpf_sk_assign``) land on them; ``getsockname()``
  of an accepted socket is then the client's original destination;
* upstream sockets carry ``SO_MARK = MARK_ZTUNNEL`` so the node's steering and
  egress guards let the ztunnel's own traffic pass instead of looping it back,
  and may bind the original client's IP with ``IP_TRANSPARENT`` so the server
  application sees the real client address.

Nothing here is async except :func:`connect_upstream`, which runs the
non-blocking connect on the running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

from node.dataplane import MARK_ZTUNNEL

from .errors import UpstreamConnectError

__all__ = [
    "DEFAULT_BACKLOG",
    "Address",
    "DialOptions",
    "connect_to_pod",
    "connect_upstream",
    "listener_socket",
    "local_address",
    "peer_address",
    "reset",
    "upstream_socket",
]

# The kernel clamps this to net.core.somaxconn; asking high costs nothing and
# keeps bursts of new connections from being dropped at SYN time.
DEFAULT_BACKLOG = 65535
# Linux values; the socket module exposes them on 3.11+, but keep a fallback so
# the numbers are visible here.
_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
_SO_MARK = getattr(socket, "SO_MARK", 36)


@dataclass(frozen=True, slots=True)
class Address:
    """An IPv4 ``ip:port`` pair."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


def listener_socket(
    host: str,
    port: int,
    *,
    transparent: bool = True,
    backlog: int = DEFAULT_BACKLOG,
) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port``.

    ``transparent`` sets ``IP_TRANSPARENT`` (needs CAP_NET_ADMIN); the steered
    listeners need it, loopback test listeners do not. Raises OSError as the
    kernel reports it; the caller turns it into a ZtunnelError with a hint.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # SO_REUSEPORT lets a new ztunnel bind beside the old one during a
        # rolling update (maxSurge 1), so the node never lacks a listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
            # The eBPF programs only steer to a listener carrying the
            # ztunnel's mark (anything else on :15001 is a foreign listener and
            # the SYN is dropped), and the egress guard passes marked replies.
            sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, MARK_ZTUNNEL)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def upstream_socket(
    *,
    mark: int | None = MARK_ZTUNNEL,
    bind_ip: str | None = None,
    transparent: bool = False,
) -> socket.socket:
    """A non-blocking, not yet connected TCP socket for the ztunnel's own traffic.

    ``mark`` is set as SO_MARK (None leaves it unset, for loopback tests run
    without CAP_NET_ADMIN). ``bind_ip`` binds the source address with an
    ephemeral port; with ``transparent`` the address need not be local, which is
    how the ztunnel connects "as" the original client.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, mark)
        if bind_ip is not None:
            if transparent:
                sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
            # Let the kernel pick the port at connect() time so many
            # connections from one client IP to different destinations can
            # share source ports (same as an ordinary unbound connect).
            sock.setsockopt(socket.SOL_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((bind_ip, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_upstream(
    dst: Address,
    *,
    mark: int | None = MARK_ZTUNNEL,
    bind_ip: str | None = None,
    transparent: bool = False,
    timeout: float = 10.0,
) -> socket.socket:
    """Connects a marked (and optionally transparent) socket to ``dst``.

    Raises :class:`UpstreamConnectError` naming the destination and the errno;
    the socket is closed on failure.
    """
    loop = asyncio.get_running_loop()
    try:
        sock = upstream_socket(mark=mark, bind_ip=bind_ip, transparent=transparent)
    except OSError as e:
        raise UpstreamConnectError(dst, e, bind_ip=bind_ip) from None
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (dst.ip, dst.port))
    except TimeoutError:
        sock.close()
        raise UpstreamConnectError(
            dst, OSError(errno.ETIMEDOUT, "connect timed out"), bind_ip=bind_ip
        ) from None
    except OSError as e:
        sock.close()
        raise UpstreamConnectError(dst, e, bind_ip=bind_ip) from None
    except BaseException:
        sock.close()
        raise
    return sock


class DialOptions(Protocol):
    """How the proxy dials pods (the proxy context carries these)."""

    mark: int | None
    transparent: bool
    connect_timeout: float


async def connect_to_pod(
    opts: DialOptions, dst: Address, client_ip: str | None
) -> socket.socket:
    """A marked connection to a local pod.

    With ``client_ip`` and a transparent proxy it comes from the client's own
    address, so the pod sees who called it; with None it comes from this node.
    """
    bind = client_ip if opts.transparent else None
    return await connect_upstream(
        dst,
        mark=opts.mark,
        bind_ip=bind,
        transparent=bind is not None,
        timeout=opts.connect_timeout,
    )


def local_address(sock: socket.socket) -> Address:
    """``getsockname()``: for a steered accepted socket, the original destination."""
    ip, port = sock.getsockname()[:2]
    return Address(str(ip), int(port))


def peer_address(sock: socket.socket) -> Address:
    """``getpeername()``: the client's address."""
    ip, port = sock.getpeername()[:2]
    return Address(str(ip), int(port))


def reset(sock: socket.socket) -> None:
    """Closes ``sock`` with a TCP RST instead of a FIN.

    SO_LINGER with a zero timeout makes close() abort the connection, so a
    refused client learns at once that nothing is behind the port and never
    reads a byte from the server side.
    """
    # Already dead: close() below is all that is left to do.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
