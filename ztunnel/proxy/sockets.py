"""Socket construction for the ztunnel's listeners and upstream connections.

Owns every ``setsockopt`` the data path needs, so the listener modules never
touch raw option numbers:

* listeners bind the wildcard address (or a configured one) with
  ``IP_TRANSPARENT`` / ``IPV6_TRANSPARENT``, which lets steered packets whose
  destination is not a local address (TPROXY or ``bpf_sk_assign``) land on
  them; ``getsockname()`` of an accepted socket is then the client's original
  destination, IPv4 or IPv6;
* upstream sockets carry ``SO_MARK = MARK_ZTUNNEL`` so the node's steering and
  egress guards let the ztunnel's own traffic pass instead of looping it back,
  and may bind the original client's IP (v4 or v6) transparently so the server
  application sees the real client address.

Dual stack: the wildcard listeners are ONE ``[::]`` socket per port with
``IPV6_V6ONLY=0`` rather than a ``0.0.0.0`` and a ``[::]`` socket side by side.
The kernel's IPv4 listener lookup (the eBPF steering's, and TPROXY's) finds
that socket too, so each port keeps exactly one accept loop, one SO_REUSEPORT
group for surge restarts and one socket to close at drain, and an address
family can never be left without a listener while the other has one. The
price is that IPv4 peers read as ``::ffff:a.b.c.d``: :func:`peer_address` and
:func:`local_address` turn them back into plain IPv4, once, at accept. A node
whose kernel has IPv6 disabled gets a plain ``0.0.0.0`` socket instead.

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
    "SAME_NODE_BUFFER",
    "Address",
    "DialOptions",
    "connect_to_pod",
    "connect_upstream",
    "family_of",
    "listener_socket",
    "local_address",
    "peer_address",
    "reset",
    "size_same_node_buffers",
    "unmap_ip",
    "upstream_socket",
]

# The kernel clamps this to net.core.somaxconn; asking high costs nothing and
# keeps bursts of new connections from being dropped at SYN time.
DEFAULT_BACKLOG = 65535
# Linux values; the socket module exposes them on 3.11+, but keep a fallback so
# the numbers are visible here.
_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
_IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
_SO_MARK = getattr(socket, "SO_MARK", 36)
# SO_RCVBUF and SO_SNDBUF of both sockets of a same-node connection carried
# by the splice(2) relay (the kernel doubles the value for its overhead).
# Fixed, not autotuned: the relay touches no byte, so how many are in flight
# decides whether they are still in the CPU caches for the receiver's copy.
# Measured (perf/README.md): on loopback smaller was better (256 KiB about
# 1.0x direct, 512 KiB 0.94x, 1 MiB 0.66-0.82x, autotuned 0.5x); between pods
# on veths in the lab bigger was (256 KiB 13.2, 512 KiB 13.7, 1 MiB 14.7,
# 2 MiB 15.1 Gbit/s). 512 KiB keeps most of both.
SAME_NODE_BUFFER = 512 * 1024
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_MAPPED_PREFIX = "::ffff:"


@dataclass(frozen=True, slots=True)
class Address:
    """An ``ip:port`` pair; ``ip`` is plain IPv4 or compressed IPv6 text."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def family_of(ip: str) -> socket.AddressFamily:
    """AF_INET6 for IPv6 text, else AF_INET (the kernel reports the error, if any)."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def unmap_ip(ip: str) -> str:
    """``::ffff:10.0.0.1`` (an IPv4 peer of a dual-stack socket) -> ``10.0.0.1``.

    The kernel always prints mapped addresses in this dotted form, so a prefix
    test suffices; anything else is returned unchanged.
    """
    if ip.startswith(_MAPPED_PREFIX) and "." in ip:
        return ip[len(_MAPPED_PREFIX) :]
    return ip


def _set_transparent(sock: socket.socket, family: int) -> None:
    # Both option names set the same kernel flag; a v6 socket gets both so
    # that its IPv4-mapped traffic (dual-stack listeners) is plainly covered,
    # whatever name a reader of the kernel source looks for.
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)


def _listen_family(host: str) -> tuple[socket.AddressFamily, str, bool]:
    """(family, bind address, dual-stack) for a configured listen address."""
    if host in _WILDCARDS:
        if socket.has_ipv6:
            try:
                socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
            except OSError:
                return socket.AF_INET, "0.0.0.0", False  # IPv6 disabled on this node
            return socket.AF_INET6, "::", True
        return socket.AF_INET, "0.0.0.0", False
    return family_of(host), host, False


def listener_socket(
    host: str,
    port: int,
    *,
    transparent: bool = True,
    backlog: int = DEFAULT_BACKLOG,
) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port``.

    A wildcard ``host`` (``0.0.0.0``, ``::`` or empty) gives one dual-stack
    ``[::]`` socket (see the module docstring); a specific address gives a
    socket of its own family only. ``transparent`` sets ``IP_TRANSPARENT`` /
    ``IPV6_TRANSPARENT`` (needs CAP_NET_ADMIN); the steered listeners need it,
    loopback test listeners do not. Raises OSError as the kernel reports it;
    the caller turns it into a ZtunnelError with a hint.
    """
    family, bind_host, dual_stack = _listen_family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            # Explicit either way: the sysctl net.ipv6.bindv6only default must
            # not decide whether IPv4 pods have a listener.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # SO_REUSEPORT lets a new ztunnel bind beside the old one during a
        # rolling update (maxSurge 1), so the node never lacks a listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            _set_transparent(sock, family)
            # The eBPF programs only steer to a listener carrying the
            # ztunnel's mark (anything else on :15001 is a foreign listener and
            # the SYN is dropped), and the egress guard passes marked replies.
            sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, MARK_ZTUNNEL)
        sock.bind((bind_host, port))
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
    family: socket.AddressFamily | None = None,
) -> socket.socket:
    """A non-blocking, not yet connected TCP socket for the ztunnel's own traffic.

    ``family`` is the destination's (default: ``bind_ip``'s, else IPv4).
    ``mark`` is set as SO_MARK (None leaves it unset, for loopback tests run
    without CAP_NET_ADMIN). ``bind_ip`` binds the source address with an
    ephemeral port; with ``transparent`` the address need not be local, which is
    how the ztunnel connects "as" the original client.
    """
    if family is None:
        family = family_of(bind_ip) if bind_ip is not None else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, mark)
        if bind_ip is not None:
            if transparent:
                _set_transparent(sock, family)
            # Let the kernel pick the port at connect() time so many
            # connections from one client IP to different destinations can
            # share source ports (same as an ordinary unbound connect). The
            # option is SOL_IP on IPv6 sockets too.
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
        sock = upstream_socket(
            mark=mark, bind_ip=bind_ip, transparent=transparent, family=family_of(dst.ip)
        )
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


async def connect_to_pod(opts: DialOptions, dst: Address, client_ip: str | None) -> socket.socket:
    """A marked connection to a local pod.

    With ``client_ip`` and a transparent proxy it comes from the client's own
    address, so the pod sees who called it; with None it comes from this node.
    So does a client of the other address family (an IPv6 client reaching an
    IPv4-only endpoint through a Service): a socket cannot bind one family and
    connect to the other.
    """
    bind = client_ip if opts.transparent else None
    if bind is not None and family_of(bind) != family_of(dst.ip):
        bind = None
    return await connect_upstream(
        dst,
        mark=opts.mark,
        bind_ip=bind,
        transparent=bind is not None,
        timeout=opts.connect_timeout,
    )


def size_same_node_buffers(*socks: socket.socket, size: int = SAME_NODE_BUFFER) -> None:
    """Fixes both buffers of each socket at ``size`` (turning autotuning off).

    Done before the relay reads anything, while the windows are still the
    initial ones: shrinking a receive buffer below a window already
    advertised would make the kernel drop segments. Best effort: a socket
    the peer has already reset keeps its defaults.
    """
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def local_address(sock: socket.socket) -> Address:
    """``getsockname()``: for a steered accepted socket, the original destination
    (IPv4-mapped addresses of a dual-stack listener as plain IPv4)."""
    ip, port = sock.getsockname()[:2]
    return Address(unmap_ip(str(ip)), int(port))


def peer_address(sock: socket.socket) -> Address:
    """``getpeername()``: the client's address (IPv4-mapped as plain IPv4)."""
    ip, port = sock.getpeername()[:2]
    return Address(unmap_ip(str(ip)), int(port))


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
