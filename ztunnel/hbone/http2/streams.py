"""The HTTP/2 stream state machine (RFC 9113 section 5.1) as a transition table.

Only the states a CONNECT tunnel can reach exist (no server push, so no
"reserved" states). :func:`transition` looks ``(state, input)`` up in
:data:`TRANSITIONS`; a pair that is not in the table raises
:class:`StreamStateError`, which the connection turns into a stream error (peer
input) or a :class:`~ztunnel.hbone.errors.LocalProtocolError` (our input).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import HboneError

__all__ = [
    "TRANSITIONS",
    "H2Stream",
    "Input",
    "State",
    "StreamStateError",
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
