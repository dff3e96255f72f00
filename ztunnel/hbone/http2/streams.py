"""HTTP/2 streams: the state machine (RFC 9113 section 5.1) and the stream table.

Only the states a CONNECT tunnel can reach exist (no server push, so no
"reserved" states). :func:`transition` looks ``(state, input)`` up in
:data:`TRANSITIONS`; a pair that is not in the table raises
:class:`StreamStateError`, which the connection turns into a stream error (peer
input) or a :class:`~ztunnel.hbone.errors.LocalProtocolError` (our input).
:class:`StreamTable` holds one connection's live streams and which stream ids
have been used, so the send and the receive side agree on both.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import HboneError

__all__ = [
    "TRANSITIONS",
    "H2Stream",
    "Input",
    "State",
    "StreamStateError",
    "StreamTable",
    "transition",
]


class State(enum.Enum):
    IDLE = "idle"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class Input(enum.Enum):
    SEND_HEADERS = "send HEADERS"
    SEND_HEADERS_END = "send HEADERS+END_STREAM"
    RECV_HEADERS = "receive HEADERS"
    RECV_HEADERS_END = "receive HEADERS+END_STREAM"
    SEND_DATA = "send DATA"
    SEND_END_STREAM = "send END_STREAM"
    RECV_DATA = "receive DATA"
    RECV_END_STREAM = "receive END_STREAM"
    SEND_RST = "send RST_STREAM"
    RECV_RST = "receive RST_STREAM"


class StreamStateError(HboneError):
    """``input`` is not allowed in ``state``."""

    def __init__(self, state: State, inp: Input) -> None:
        super().__init__(f"cannot {inp.value} on a stream that is {state.value}")
        self.state = state
        self.input = inp


_S, _I = State, Input
TRANSITIONS: dict[tuple[State, Input], State] = {
    (_S.IDLE, _I.SEND_HEADERS): _S.OPEN,
    (_S.IDLE, _I.SEND_HEADERS_END): _S.HALF_CLOSED_LOCAL,
    (_S.IDLE, _I.RECV_HEADERS): _S.OPEN,
    (_S.IDLE, _I.RECV_HEADERS_END): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.SEND_HEADERS): _S.OPEN,
    (_S.OPEN, _I.SEND_HEADERS_END): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_HEADERS): _S.OPEN,
    (_S.OPEN, _I.RECV_HEADERS_END): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_END_STREAM): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_END_STREAM): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.SEND_RST): _S.CLOSED,
    (_S.OPEN, _I.RECV_RST): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_HEADERS): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_HEADERS_END): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_END_STREAM): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.SEND_RST): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_RST): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_HEADERS): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_HEADERS_END): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_END_STREAM): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_RST): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_RST): _S.CLOSED,
}


def transition(state: State, inp: Input) -> State:
    try:
        return TRANSITIONS[(state, inp)]
    except KeyError:
        raise StreamStateError(state, inp) from None


@dataclass(slots=True)
class H2Stream:
    """Per-stream bookkeeping inside :class:`~ztunnel.hbone.http2.connection.H2Connection`.

    ``send_window`` may go negative after the peer lowers INITIAL_WINDOW_SIZE
    (RFC 9113 section 6.9.2). ``unacked`` counts received bytes the driver has
    delivered but not yet returned to the peer with WINDOW_UPDATE.
    """

    stream_id: int
    send_window: int
    recv_window: int
    opened_at: float
    state: State = State.IDLE
    unacked: int = 0
    local_initiated: bool = False
    response_sent: bool = False
    response_received: bool = False  # a final response arrived (client side)
    tunnel_open: bool = False  # a 2xx response was sent/received: DATA may flow

    def apply(self, inp: Input) -> State:
        self.state = transition(self.state, inp)
        return self.state

    @property
    def can_send(self) -> bool:
        return self.state in (State.OPEN, State.HALF_CLOSED_REMOTE)

    @property
    def can_receive(self) -> bool:
        return self.state in (State.OPEN, State.HALF_CLOSED_LOCAL)


class StreamTable:
    """One connection's live streams, and the ids used on it so far.

    ``live`` is the only mapping of open streams; it is never replaced, only
    emptied, so a reference to it stays valid for the connection's life.
    ``recently_reset`` remembers the last ``reset_memory`` streams reset either
    way: frames the peer had in flight on them are expected, not errors.
    """

    __slots__ = (
        "_goaway_last",
        "highest_remote",
        "live",
        "local_odd",
        "next_local",
        "recently_reset",
        "reset_memory",
    )

    def __init__(self, client: bool, reset_memory: int) -> None:
        self.live: dict[int, H2Stream] = {}
        self.recently_reset: OrderedDict[int, None] = OrderedDict()
        self.reset_memory = reset_memory
        self.local_odd = client  # clients open odd stream ids, servers even ones
        self.next_local = 1 if client else 2
        self.highest_remote = 0  # the highest peer-initiated id seen
        self._goaway_last: int | None = None

    def is_local_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.local_odd

    def is_idle(self, stream_id: int) -> bool:
        """True for ids never used yet (frames on them are connection errors)."""
        if self.is_local_id(stream_id):
            return stream_id >= self.next_local
        return stream_id > self.highest_remote

    def remember_reset(self, stream_id: int) -> None:
        self.recently_reset[stream_id] = None
        if len(self.recently_reset) > self.reset_memory:
            self.recently_reset.popitem(last=False)

    def goaway_last_stream(self) -> int:
        """The last-stream-id our GOAWAY carries.

        Fixed by the first GOAWAY: a later one never raises it, since the peer
        may already have retried the streams above it elsewhere.
        """
        if self._goaway_last is None:
            self._goaway_last = self.highest_remote
        return self._goaway_last
