"""HTTP/2 flow control for one connection, both directions (RFC 9113 section 5.2).

:class:`FlowControl` owns the connection-level windows and applies the
per-stream ones kept on each :class:`~ztunnel.hbone.http2.streams.H2Stream`:

* send side: how much DATA the peer lets us send, grown by its WINDOW_UPDATE
  frames and shifted by its SETTINGS_INITIAL_WINDOW_SIZE;
* receive side: how much the peer may still send. A window reopens only when
  the driver says the bytes left the process, and in batches (one
  WINDOW_UPDATE once half a window is due), so nothing buffers more than it
  advertised and the peer is not sent a frame per DATA frame.

WINDOW_UPDATE frames go into the connection's output list, shared with the
:class:`~ztunnel.hbone.http2.connection.H2Connection` that holds this object,
so they keep their place among the other frames.
"""

from __future__ import annotations

from ..errors import LocalProtocolError
from . import frames as fr
from .frames import ErrorCode
from .settings import H2Settings
from .streams import H2Stream
from .violations import ConnError, StreamError

__all__ = ["FlowControl"]


class FlowControl:
    """Connection windows, stream window rules and WINDOW_UPDATE batching."""

    __slots__ = (
        "_conn_window",
        "_half_conn",
        "_half_stream",
        "_out",
        "_stream_window",
        "recv_window",
        "send_window",
        "unacked",
    )

    def __init__(self, settings: H2Settings, out: list[bytes | memoryview]) -> None:
        self._out = out
        self._conn_window = settings.connection_window
        self._stream_window = settings.initial_stream_window
        self._half_conn = settings.connection_window // 2
        self._half_stream = settings.initial_stream_window // 2
        self.send_window = fr.DEFAULT_WINDOW  # what the peer lets us send, connection-wide
        self.recv_window = fr.DEFAULT_WINDOW  # what the peer may still send us
        self.unacked = 0  # delivered bytes not yet returned with WINDOW_UPDATE

    def open_connection_window(self) -> None:
        """Raise our connection window from the RFC default to the configured size."""
        grow = self._conn_window - fr.DEFAULT_WINDOW
        if grow > 0:
            self._out.append(fr.window_update_frame(0, grow))
            self.recv_window += grow

    # --- sending

    def sendable(self, stream: H2Stream) -> int:
        """Bytes of DATA ``stream`` may carry right now."""
        return max(0, min(stream.send_window, self.send_window))

    def peer_connection_update(self, inc: int) -> None:
        """The peer's WINDOW_UPDATE on stream 0 (``inc`` already masked)."""
        if inc == 0:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
        self.send_window += inc
        if self.send_window > fr.MAX_WINDOW:
            raise ConnError(ErrorCode.FLOW_CONTROL_ERROR, "connection window grew past 2^31-1")

    @staticmethod
    def peer_stream_update(stream: H2Stream, inc: int) -> None:
        """The peer's WINDOW_UPDATE on a live stream (``inc`` already masked)."""
        if inc == 0:
            raise StreamError(
                stream.stream_id, ErrorCode.PROTOCOL_ERROR, "stream WINDOW_UPDATE of 0"
            )
        stream.send_window += inc
        if stream.send_window > fr.MAX_WINDOW:
            raise StreamError(
                stream.stream_id, ErrorCode.FLOW_CONTROL_ERROR, "stream window grew past 2^31-1"
            )

    @staticmethod
    def shift_stream_windows(streams: dict[int, H2Stream], delta: int) -> None:
        """The peer changed SETTINGS_INITIAL_WINDOW_SIZE by ``delta`` (section 6.9.2).

        A window may go negative; one pushed past 2^31-1 is a connection error.
        """
        for stream in streams.values():
            stream.send_window += delta
            if stream.send_window > fr.MAX_WINDOW:
                raise ConnError(ErrorCode.FLOW_CONTROL_ERROR, "a stream window grew past 2^31-1")

    # --- receiving

    def receive_connection(self, length: int) -> None:
        """A DATA frame of ``length`` bytes arrived: charge the connection window."""
        if length > self.recv_window:
            raise ConnError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= length

    def credit_connection(self, size: int) -> None:
        """``size`` received bytes are gone from the process: return them, batched."""
        due = self._conn_window - self.recv_window - self.unacked
        if size > due:
            raise LocalProtocolError(f"acknowledging {size} bytes; the connection owes {due}")
        self.unacked += size
        if self.unacked >= self._half_conn:
            self._out.append(fr.window_update_frame(0, self.unacked))
            self.recv_window += self.unacked
            self.unacked = 0

    def credit_stream(self, stream: H2Stream, size: int) -> None:
        """As :meth:`credit_connection`, for the stream's own window."""
        due = self._stream_window - stream.recv_window - stream.unacked
        if size > due:
            raise LocalProtocolError(
                f"acknowledging {size} bytes; stream {stream.stream_id} owes {due}"
            )
        stream.unacked += size
        if stream.unacked >= self._half_stream:
            self._out.append(fr.window_update_frame(stream.stream_id, stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0
