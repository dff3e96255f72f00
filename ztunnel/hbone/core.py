"""State shared by both halves of the sans-IO HTTP/2 connection.

:class:`H2Core` holds the fields and the state-changing helpers; the receive
half (:mod:`ztunnel.hbone.receive`) and the public send API
(:mod:`ztunnel.hbone.connection`) build on it, one concern per module.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable

import hpack

from . import frames as fr
from .config import H2Settings, RateWindow
from .errors import LocalProtocolError, RemoteProtocolError
from .events import ConnectionTerminated, Event, StreamReset
from .hpack_encoder import HeaderEncoder
from .streams import H2Stream, Input, State, StreamStateError

__all__ = ["ConnError", "H2Core", "Role", "StreamError"]

E = fr.ErrorCode


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ConnError(Exception):
    """Internal: the peer caused a connection error; becomes GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamError(Exception):
    """Internal: the peer caused a stream error; becomes RST_STREAM(code)."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code


class H2Core:
    """Fields and helpers of one HTTP/2 connection (no IO)."""

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
        self._decoder = hpack.Decoder(max_header_list_size=cfg.max_header_list_size)
        self._decoder.max_allowed_table_size = cfg.header_table_size
        self._early_resets = RateWindow(cfg.max_early_resets, cfg.early_reset_period)
        self._control_rate = RateWindow(cfg.max_control_frames_per_second, 1.0)
        self._empty_rate = RateWindow(cfg.max_empty_frames_per_second, 1.0)

    def data_to_send(self) -> list[bytes | memoryview]:
        """Everything queued since the last call, in order; write it in one go."""
        out, self._out = self._out, []
        return out

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def last_processed_stream(self) -> int:
        """The highest peer-initiated stream id seen (the GOAWAY last-stream-id)."""
        return self._highest_remote

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

    def _send_goaway(self, code: int, message: str) -> int:
        # A later GOAWAY never raises the last-stream-id of an earlier one.
        if self._goaway_last is None:
            self._goaway_last = self._highest_remote
        self._out.append(fr.goaway_frame(self._goaway_last, code, message.encode()[:256]))
        self.goaway_sent = True
        return self._goaway_last

    def _fail(self, exc: ConnError, events: list[Event]) -> None:
        """A connection error: GOAWAY, every stream gone, nothing more processed."""
        last = self._send_goaway(exc.code, exc.message)
        self.closed = True
        self.error = RemoteProtocolError(exc.message, exc.code)
        self._streams.clear()
        events.append(ConnectionTerminated(exc.code, last, False, True, exc.message))

    def _stream_error(self, exc: StreamError, events: list[Event]) -> None:
        stream = self._streams.pop(exc.stream_id, None)
        self._remember_reset(exc.stream_id)
        self._out.append(fr.rst_stream_frame(exc.stream_id, exc.code))
        if stream is not None:
            stream.state = State.CLOSED
            events.append(StreamReset(exc.stream_id, exc.code, False))

    def _remote_transition(self, stream: H2Stream, inp: Input) -> None:
        try:
            stream.apply(inp)
        except StreamStateError:
            raise StreamError(
                stream.stream_id, E.STREAM_CLOSED, f"{inp.value} on a {stream.state.value} stream"
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
