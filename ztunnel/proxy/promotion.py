"""When a relayed same-node connection is handed to the kernel splice (``auto``).

The kernel splice (:mod:`ztunnel.proxy.splice`) wins for request/response
traffic and loses to the Python relay for bulk (perf/README.md). In ``auto``
mode a same-node connection therefore starts on the relay, and this module
decides, from what the relay has read so far, whether it behaves
interactively. The state is a value and the decision a pure function, both
table tested; the relay feeds them and does the I/O.

Definitions, all counted on the relay's reads:

* a *burst* is the run of bytes read in one direction before the other
  direction is read;
* a *turn* ends when the direction flips; it is *small* when the burst it
  ends is at most :data:`MAX_MESSAGE` bytes;
* a burst above :data:`BULK_BURST` marks the connection as bulk for good;
* *backlog* is what the relay still holds in user space (both transports'
  write buffers); promotion needs none, so that no byte is stranded.

A connection is promoted at the start of a burst (the moment the direction
flips) once :data:`PROMOTE_AFTER_TURNS` consecutive turns were small, the
first read of the new burst is small too, neither side has sent its EOF and
there is no backlog. With the default four turns, request, response,
request, response: the third request is the one that goes into the splice.
A bulk flow has no turns (one direction) or large bursts, so it never
promotes to the sk_skb splice. When the watcher is allowed to (``pipe``), a
connection that turns bulk (a burst above :data:`BULK_BURST`) is handed to
the splice(2) relay instead (:mod:`ztunnel.proxy.pipes`), which moves bulk
bytes socket -> pipe -> socket without copying them through Python; the
relay first lets its write buffers drain, so that no byte is reordered.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Final

__all__ = [
    "BULK_BURST",
    "MAX_MESSAGE",
    "PROMOTE_AFTER_TURNS",
    "Activity",
    "Interactivity",
    "Promotion",
    "observe",
    "promotion_decision",
]

# Consecutive small turns before a connection counts as interactive.
PROMOTE_AFTER_TURNS: Final = 4
# The largest burst that still counts as one message of a conversation.
MAX_MESSAGE: Final = 16 * 1024
# A burst above this is a transfer: the relay keeps the connection for good.
BULK_BURST: Final = 1024 * 1024


class Promotion(enum.Enum):
    """What the relay does with the connection after this read."""

    WAIT = "wait"  # keep relaying, decide again on a later read
    PROMOTE = "promote"  # hand both sockets to the kernel splice now
    BULK = "bulk"  # hand both sockets to the splice(2) relay (once drained)
    NEVER = "never"  # bulk or half-closed: the relay keeps it to the end


@dataclass(frozen=True, slots=True)
class Activity:
    """What the relay has seen of one connection (client-to-server is ``from_client``)."""

    turns: int = 0  # consecutive small turns
    from_client: bool | None = None  # direction of the current burst; None before any byte
    burst: int = 0  # bytes read so far in the current burst
    flipped: bool = False  # the last read started a new burst
    bulk: bool = False


def observe(activity: Activity, from_client: bool, nbytes: int) -> Activity:
    """The activity after the relay read ``nbytes`` (> 0) from one side."""
    if activity.from_client is None or activity.from_client == from_client:
        burst = activity.burst + nbytes
        return replace(
            activity,
            from_client=from_client,
            burst=burst,
            flipped=False,
            bulk=activity.bulk or burst > BULK_BURST,
        )
    # The direction flipped: the previous burst ended a turn.
    small = activity.burst <= MAX_MESSAGE
    return Activity(
        turns=activity.turns + 1 if small else 0,
        from_client=from_client,
        burst=nbytes,
        flipped=True,
        bulk=activity.bulk or nbytes > BULK_BURST,
    )


def promotion_decision(
    activity: Activity, *, backlog: int, eof: bool, promote: bool = True, pipe: bool = False
) -> Promotion:
    """May the relay hand the connection to the splice right after this read?

    ``backlog``: bytes still in the relay's write buffers (both ways);
    ``eof``: either side's EOF has been read (a half-closed socket cannot
    enter a sockhash, and its FIN has already been forwarded by the relay).
    ``promote``: the sk_skb splice is available; ``pipe``: the splice(2)
    relay may take bulk connections (it drains the backlog itself).
    """
    if eof:
        return Promotion.NEVER
    if activity.bulk:
        return Promotion.BULK if pipe else Promotion.NEVER
    if (
        promote
        and activity.flipped
        and activity.turns >= PROMOTE_AFTER_TURNS
        and activity.burst <= MAX_MESSAGE
        and backlog == 0
    ):
        return Promotion.PROMOTE
    return Promotion.WAIT


class Interactivity:
    """The relay's per-connection watcher: feeds :func:`observe`, asks the decision."""

    __slots__ = ("activity", "pipe", "promote")

    def __init__(self, *, promote: bool = True, pipe: bool = False) -> None:
        self.activity = Activity()
        self.promote = promote
        self.pipe = pipe

    def read(self, from_client: bool, nbytes: int, *, backlog: int, eof: bool) -> Promotion:
        self.activity = observe(self.activity, from_client, nbytes)
        return promotion_decision(
            self.activity, backlog=backlog, eof=eof, promote=self.promote, pipe=self.pipe
        )
