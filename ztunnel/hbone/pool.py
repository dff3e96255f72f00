"""The HBONE client connection pool.

Connections are keyed by (source identity, destination identity, destination
IP, port), as in Istio's ztunnel: a connection carries one source workload's
certificate and proves one destination identity, so it can only be shared by
streams with the same pair. A connection carries at most
``max_streams_per_connection`` (100) streams, or fewer if the server says so;
when all are full a new one is dialled. Concurrent callers needing a new
connection for the same key share one dial. Connections without streams for
``pool_idle_timeout`` (5 minutes) are closed with GOAWAY.

The pick is the pure :func:`pick_connection`; the awaits come after it. The
``connect`` callable dials the TCP socket, so the proxy can set ``SO_MARK`` or
bind a source address before it connects.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from ztunnel.tls import CredentialError, TlsContextCache, WorkloadCredential

from .client import HboneClientConnection, HboneStream, connect_hbone
from .config import HboneConfig
from .connect import BadAuthority, parse_authority
from .endpoint import close_selected, drain
from .errors import HboneConnectError, StreamRefused
from .stream import CloseReason

__all__ = [
    "ConnectionView",
    "HboneClientPool",
    "PoolConnectionInfo",
    "PoolKey",
    "SocketFactory",
    "default_connect",
    "pick_connection",
]

SocketFactory = Callable[[str, int], Awaitable[socket.socket]]
_OPEN_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class PoolKey:
    src: SpiffeId
    dst: SpiffeId
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class ConnectionView:
    """What :func:`pick_connection` needs to know about one pooled connection."""

    usable: bool  # transport open, no GOAWAY either way
    active: int  # live streams
    reserved: int  # streams promised to callers, HEADERS not sent yet
    peer_limit: int  # the server's SETTINGS_MAX_CONCURRENT_STREAMS
    cert_expired: bool  # our client certificate on it has expired


def pick_connection(conns: Sequence[ConnectionView], max_streams: int) -> int | None:
    """Index of the connection to put a new stream on, or None to dial a new one.

    Prefer the busiest connection with room, so idle ones drain and get released.
    """
    best: int | None = None
    best_load = -1
    for i, c in enumerate(conns):
        load = c.active + c.reserved
        if not c.usable or c.cert_expired or load >= min(max_streams, c.peer_limit):
            continue
        if load > best_load:
            best, best_load = i, load
    return best


@dataclass(frozen=True, slots=True)
class PoolConnectionInfo:
    """One pooled connection, for the admin API."""

    key: PoolKey
    peer_addr: tuple[str, int]
    streams: int
    going_away: bool


async def default_connect(ip: str, port: int) -> socket.socket:
    """A plain non-blocking TCP connect (the proxy passes its own marked dialer)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, (ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class _Dial:
    future: asyncio.Future[HboneClientConnection]
    claimed: int = 1  # callers waiting for this connection (reservations)
    task: asyncio.Task[None] | None = field(default=None)


class HboneClientPool:
    """Opens HBONE streams, reusing connections per (src, dst identity, dst IP)."""

    def __init__(
        self,
        bundle: Callable[[], TrustBundle],
        *,
        connect: SocketFactory = default_connect,
        config: HboneConfig | None = None,
        contexts: TlsContextCache | None = None,
    ) -> None:
        self.config = config or HboneConfig()
        self._bundle = bundle
        self._connect = connect
        self._contexts = contexts or TlsContextCache()
        self._conns: dict[PoolKey, list[HboneClientConnection]] = {}
        self._dials: dict[PoolKey, list[_Dial]] = {}
        self._closing = False

    # ---------------------------------------------------------- streams

    async def open_stream(
        self,
        src_cert: WorkloadCredential,
        dst_ip: str,
        hbone_port: int,
        expected_identity: SpiffeId,
        target: str | tuple[str, int],
        forwarded_for: tuple[str, int] | None = None,
        *,
        traceparent: str | None = None,
        baggage: str | None = None,
    ) -> HboneStream:
        """A CONNECT tunnel to ``target`` ("ip:port") through ``dst_ip:hbone_port``,
        presenting ``src_cert`` and requiring the server to be ``expected_identity``.

        Raises ConnectRefused (the server's status), HboneConnectError (dial,
        TLS, identity, timeout) - every error says which destination failed.
        """
        if self._closing:
            raise HboneConnectError("the HBONE pool is shutting down")
        if isinstance(target, str):
            try:
                target = parse_authority(target)
            except BadAuthority as exc:
                raise HboneConnectError(f"bad CONNECT target: {exc}") from None
        key = PoolKey(src_cert.identity, expected_identity, dst_ip, hbone_port)
        for attempt in range(_OPEN_ATTEMPTS):
            conn = await self._acquire(key, src_cert)
            try:
                return await conn.open_stream(
                    target, forwarded_for, traceparent=traceparent, baggage=baggage
                )
            except StreamRefused:
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise
            finally:
                conn.reserved -= 1
        raise AssertionError("unreachable")

    def _views(self, key: PoolKey) -> list[ConnectionView]:
        now = datetime.now(UTC)
        return [
            ConnectionView(
                usable=c.usable,
                active=len(c.streams),
                reserved=c.reserved,
                peer_limit=c.conn.peer_max_concurrent_streams,
                cert_expired=c.cert_not_after is not None and c.cert_not_after <= now,
            )
            for c in self._conns.get(key, ())
        ]

    async def _acquire(self, key: PoolKey, cred: WorkloadCredential) -> HboneClientConnection:
        """A connection with a stream slot reserved for the caller."""
        limit = self.config.max_streams_per_connection
        index = pick_connection(self._views(key), limit)
        if index is not None:
            conn = self._conns[key][index]
            conn.reserved += 1
            return conn
        dial = next((d for d in self._dials.get(key, ()) if d.claimed < limit), None)
        if dial is None:
            loop = asyncio.get_running_loop()
            dial = _Dial(loop.create_future(), claimed=1)
            self._dials.setdefault(key, []).append(dial)
            dial.task = loop.create_task(self._dial(key, cred, dial))
        else:
            dial.claimed += 1
        try:
            return await asyncio.shield(dial.future)
        except asyncio.CancelledError:
            if dial.future.done() and not dial.future.cancelled() and not dial.future.exception():
                dial.future.result().reserved -= 1
            else:
                dial.claimed -= 1
            raise

    async def _dial(self, key: PoolKey, cred: WorkloadCredential, dial: _Dial) -> None:
        try:
            conn = await self._establish(key, cred)
        except asyncio.CancelledError:
            dial.future.cancel()
            raise
        except BaseException as exc:
            dial.future.set_exception(exc)
            dial.future.exception()  # retrieved here: waiters may all be gone
        else:
            conn.reserved += dial.claimed
            if not conn.closed.done():  # it may already have been refused and closed
                self._conns.setdefault(key, []).append(conn)
            dial.future.set_result(conn)
        finally:
            dials = self._dials.get(key, [])
            if dial in dials:
                dials.remove(dial)
            if not dials:
                self._dials.pop(key, None)

    async def _establish(self, key: PoolKey, cred: WorkloadCredential) -> HboneClientConnection:
        where = f"{key.ip}:{key.port}" if ":" not in key.ip else f"[{key.ip}]:{key.port}"
        bundle = self._bundle()
        try:
            ctx = self._contexts.client(cred, bundle)
        except CredentialError as exc:
            raise HboneConnectError(f"cannot use the certificate of {key.src}: {exc}") from exc
        try:
            sock = await asyncio.wait_for(
                self._connect(key.ip, key.port), self.config.handshake_timeout
            )
        except (TimeoutError, OSError) as exc:
            raise HboneConnectError(
                f"cannot connect to HBONE {where} for {key.dst}: {exc or 'timed out'}",
                hint="check that the destination node is up and its ztunnel listens there",
            ) from exc
        return await connect_hbone(
            sock,
            ctx,
            expected_identity=key.dst,
            trust_domain=bundle.trust_domain,
            config=self.config,
            cert_not_after=cred.not_after,
            on_closed=lambda c: self._forget(key, c),
        )

    def _forget(self, key: PoolKey, conn: HboneClientConnection) -> None:
        conns = self._conns.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]

    # ------------------------------------------------------- operations

    def _all(self) -> list[HboneClientConnection]:
        return [c for conns in self._conns.values() for c in conns]

    def connections(self) -> list[PoolConnectionInfo]:
        return [
            PoolConnectionInfo(key, c.peer_addr, len(c.streams), c.going_away)
            for key, conns in self._conns.items()
            for c in conns
        ]

    def streams(self) -> list[HboneStream]:
        """Every live outbound stream."""
        return [s for c in self._all() for s in c.streams.values() if isinstance(s, HboneStream)]

    def close_streams(
        self,
        predicate: Callable[[HboneStream], bool],
        reason: CloseReason = CloseReason.CLOSED,
        detail: str = "no longer allowed by policy",
    ) -> int:
        """Reset the live streams ``predicate`` selects; returns how many."""
        return close_selected(self.streams(), predicate, reason, detail)

    async def shutdown(self, grace: float | None = None) -> None:
        """GOAWAY on every connection, let streams drain for ``grace`` seconds, then
        reset what is left and close."""
        self._closing = True
        grace = self.config.shutdown_grace if grace is None else grace
        await drain(self._all(), grace)
