"""What every listener shares: the narrowed handles of the ztunnel's components,
and the bookkeeping every proxied connection goes through.

A listener module receives one :class:`ProxyContext`; it reads the current
snapshot from the store, decides with a pure function (:func:`.route.route`,
:func:`.decide.decide_inbound`, :func:`.decide.decide_plaintext`), and then
calls :func:`proxied` (register, count, relay, log) or :func:`refuse` (reset,
count, log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from node.dataplane import MARK_ZTUNNEL
from node.policy import Connection
from node.state import StateStore
from ztunnel.metrics import TrafficMetrics

from .connections import (
    FLAG_DOWNSTREAM_CLOSED,
    ConnectionInfo,
    ConnectionRegistry,
    LiveConnection,
)
from .errors import ProxyError
from .relay import RelayResult
from .route import RoundRobin
from .sockets import reset

__all__ = ["ProxyContext", "RelayFn", "proxied", "refuse"]

log = logging.getLogger("veil.ztunnel.proxy")

# Runs the data phase of one connection with its live counters; returns how it ended.
RelayFn = Callable[[LiveConnection], Awaitable[RelayResult]]


@dataclass(eq=False)
class ProxyContext:
    """Shared by the three listeners of one ztunnel.

    ``mark`` is the SO_MARK of the ztunnel's own sockets (None only for
    unprivileged tests); ``transparent`` makes upstream connections to local
    pods come from the original client IP (IP_TRANSPARENT), so applications
    see who called them.
    """

    store: StateStore
    metrics: TrafficMetrics
    registry: ConnectionRegistry = field(default_factory=ConnectionRegistry)
    mark: int | None = MARK_ZTUNNEL
    transparent: bool = True
    connect_timeout: float = 10.0
    choose: RoundRobin = field(default_factory=RoundRobin)
    # Ports of this ztunnel's own listeners (loop guard on the outbound path).
    own_ports: frozenset[int] = frozenset()


def refuse(
    ctx: ProxyContext,
    sock: socket.socket | None,
    info: ConnectionInfo,
    reason: str,
    flags: str,
    *,
    policy: str | None = None,
) -> None:
    """Resets ``sock`` (RST, before any byte from a server) and reports the
    refusal: a metrics count and an access log line with ``reason``."""
    if sock is not None:
        reset(sock)
    record = LiveConnection(id=0, info=info, authz=None, verdict=f"deny: {reason}")
    ctx.metrics.connection_opened(info.labels())
    ctx.metrics.connection_closed(record.report(response_flags=flags, policy=policy))


async def proxied(
    ctx: ProxyContext,
    info: ConnectionInfo,
    relay: RelayFn,
    *,
    authz: Connection | None = None,
    verdict: str = "allow",
    policy: str | None = None,
) -> None:
    """Registers a connection, runs ``relay`` and writes its access log line.

    A connection closed from outside (policy re-check, shutdown) arrives here
    as a cancellation of the current task; ``relay`` resets its sockets on the
    way out, and the task ends normally after logging. ``relay`` owns the
    sockets: it closes or resets them however it ends.
    """
    conn = ctx.registry.add(info, authz=authz, verdict=verdict)
    ctx.metrics.connection_opened(info.labels())
    error: str | None = None
    flags: str | None = None
    try:
        running = relay(conn)
        # The closure (and the objects only it refers to) need not live as long
        # as the connection: its coroutine keeps what it uses.
        del relay
        result = await running
        error, flags = result.error, result.flags
    except asyncio.CancelledError:
        if conn.close_reason is None:
            conn.close("cancelled", FLAG_DOWNSTREAM_CLOSED)
        error = conn.close_reason
    except ProxyError as e:
        error, flags = str(e.message), e.flags
    except Exception as e:
        log.exception("connection %d (%s -> %s) failed", conn.id, info.src, info.dst)
        error = f"{type(e).__name__}: {e}"
    finally:
        ctx.registry.remove(conn)
        with contextlib.suppress(Exception):
            ctx.metrics.connection_closed(
                conn.report(error=error, response_flags=flags, policy=policy)
            )
