"""The state under :class:`~ztunnel.hbone.http2.connection.H2Connection`.

:class:`ConnectionCore` owns what the send and receive paths share: the stream
table, the peer's settings, both directions' connection windows, the abuse
budgets (one :class:`~ztunnel.hbone.http2.settings.Budget` per cheap frame
kind) and the helpers that turn a violation into GOAWAY or RST_STREAM. It has
no public API of its own: :class:`~ztunnel.hbone.http2.receive.FrameReceiver`
adds the frame handlers and ``H2Connection`` the calls a driver makes.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable

from ..errors import LocalProtocolError, RemoteProtocolError
from . import frames as fr
from .blocks import HeaderBlocks
from .events import ConnectionTerminated, Event, StreamReset
from .frames import ErrorCode
from .hpack_encoder import HeaderEncoder
from .settings import Budget, H2Settings
from .streams import H2Stream, Input, State, StreamStateError
from .violations import ConnError, StreamError

__all__ = ["ConnectionCore", "Role"]


def _per_second(limit: int) -> Budget:
    return Budget(limit, limit)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ConnectionCore:
    """The state of one HTTP/2 connection and the helpers both directions share."""

    def __init__(
        self,
        role: Role,
        settings: H2Settings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        cfg = settings or H2Settings()
        self.role = role
        self.settings = cfg
        self._clock = clock
        self._out: list[bytes | memoryview] = []
        self._streams: dict[int, H2Stream] = {}
        self._recently_reset: OrderedDict[int, None] = OrderedDict()
        self._highest_remote = 0
        self._next_local = 1 if role is Role.CLIENT else 2
        self.error: RemoteProtocolError | None = None
        self.closed = False  # no frame is processed or produced any more
        self.goaway_sent = False
        self.goaway_received = False
        self._goaway_last: int | None = None  # last-stream-id of our first GOAWAY
        # Peer settings: RFC 9113 defaults until its SETTINGS arrive.
        self.peer_max_concurrent_streams = fr.MAX_WINDOW
        self.peer_initial_window = fr.DEFAULT_WINDOW
        self.peer_max_frame_size = fr.DEFAULT_MAX_FRAME_SIZE
        self._conn_send_window = fr.DEFAULT_WINDOW
        # Our receive side: the window the peer may still fill, and what is due back.
        self._conn_recv_window = fr.DEFAULT_WINDOW
        self._conn_unacked = 0
        self._settings_unacked = 0
        self._encoder = HeaderEncoder()
        self._blocks = HeaderBlocks(cfg)
        self._first_frame = True
        self._events: list[Event] = []  # of the receive_some() call under way
        self._windows_signalled: set[int] = set()  # WindowUpdated already in _events
        self._data_sid = 0  # the DATA frame being streamed out
        self._data_end = False
        self._data_deliver = False
        self._early_resets = Budget(
            cfg.max_early_resets / cfg.early_reset_period, cfg.max_early_resets
        )
        self._control_budget = _per_second(cfg.max_control_frames_per_second)
        self._empty_budget = _per_second(cfg.max_empty_frames_per_second)
        self._window_budget = _per_second(cfg.max_window_updates_per_second)
        self._tiny_budget = _per_second(cfg.max_tiny_data_per_second)
        self._closed_budget = _per_second(cfg.max_closed_stream_frames_per_second)

    # --- budgets and errors

    def _spend(self, budget: Budget, what: str) -> None:
        if budget.spend(self._clock()):
            raise ConnError(ErrorCode.ENHANCE_YOUR_CALM, f"too many {what}")

    def _is_local_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == (self.role is Role.CLIENT)

    def _is_idle(self, stream_id: int) -> bool:
        """True for ids never used yet (frames on them are connection errors)."""
        if self._is_local_id(stream_id):
            return stream_id >= self._next_local
        return stream_id > self._highest_remote

    def _remember_reset(self, stream_id: int) -> None:
        self._recently_reset[stream_id] = None
        if len(self._recently_reset) > self.settings.reset_memory:
            self._recently_reset.popitem(last=False)

    def _send_goaway(self, code: int, message: str) -> int:
        # A later GOAWAY never raises the last-stream-id of an earlier one.
        if self._goaway_last is None:
            self._goaway_last = self._highest_remote
        self._out.append(fr.goaway_frame(self._goaway_last, code, message.encode()[:256]))
        self.goaway_sent = True
        return self._goaway_last

    def _fail(self, exc: ConnError) -> None:
        """A connection error: GOAWAY, every stream gone, nothing more processed."""
        last = self._send_goaway(exc.code, exc.message)
        self.closed = True
        self.error = RemoteProtocolError(exc.message, exc.code)
        self._streams.clear()
        self._blocks.drop()
        self._events.append(ConnectionTerminated(exc.code, last, False, True, exc.message))

    def _stream_error(self, exc: StreamError) -> None:
        stream = self._streams.pop(exc.stream_id, None)
        self._remember_reset(exc.stream_id)
        self._out.append(fr.rst_stream_frame(exc.stream_id, exc.code))
        if stream is not None:
            stream.state = State.CLOSED
            self._events.append(StreamReset(exc.stream_id, exc.code, False))

    def _remote_transition(self, stream: H2Stream, inp: Input) -> None:
        try:
            stream.apply(inp)
        except StreamStateError:
            raise StreamError(
                stream.stream_id,
                ErrorCode.STREAM_CLOSED,
                f"{inp.value} on a {stream.state.value} stream",
            ) from None
        if stream.state is State.CLOSED:
            del self._streams[stream.stream_id]

    def _local_transition(self, stream: H2Stream, inp: Input) -> None:
        try:
            stream.apply(inp)
        except StreamStateError as exc:
            raise LocalProtocolError(f"stream {stream.stream_id}: {exc.message}") from None
        if stream.state is State.CLOSED:
            del self._streams[stream.stream_id]

    # --- flow control

    def _credit_connection(self, size: int) -> None:
        cfg = self.settings
        due = cfg.connection_window - self._conn_recv_window - self._conn_unacked
        if size > due:
            raise LocalProtocolError(f"acknowledging {size} bytes; the connection owes {due}")
        self._conn_unacked += size
        if self._conn_unacked >= cfg.connection_window // 2:
            self._out.append(fr.window_update_frame(0, self._conn_unacked))
            self._conn_recv_window += self._conn_unacked
            self._conn_unacked = 0

    def _credit_stream(self, stream: H2Stream, size: int) -> None:
        cfg = self.settings
        due = cfg.initial_stream_window - stream.recv_window - stream.unacked
        if size > due:
            raise LocalProtocolError(
                f"acknowledging {size} bytes; stream {stream.stream_id} owes {due}"
            )
        stream.unacked += size
        if stream.unacked >= cfg.initial_stream_window // 2:
            self._out.append(fr.window_update_frame(stream.stream_id, stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0
