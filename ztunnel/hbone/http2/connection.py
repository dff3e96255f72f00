"""A sans-IO HTTP/2 connection for exactly what HBONE needs: CONNECT tunnels.

:class:`H2Connection` takes bytes (:meth:`~H2Connection.receive_data`) and
calls (send a request, a response, data, a reset...) and produces bytes
(:meth:`~H2Connection.data_to_send`) and :mod:`events
<ztunnel.hbone.http2.events>`. It never touches a socket, and reads time only
through the clock it is given, so every exchange can be scripted in a unit
test. It is composed of parts it holds as attributes, one concern each:

* :class:`~ztunnel.hbone.http2.streams.StreamTable`: the live streams and the
  stream ids used so far;
* :class:`~ztunnel.hbone.http2.flow.FlowControl`: the windows both ways and
  WINDOW_UPDATE batching;
* :class:`~ztunnel.hbone.http2.receive.FrameReceiver`: what each frame from
  the peer means (it owns the :class:`~ztunnel.hbone.http2.decoder.FrameDecoder`
  that splits the bytes into frames).

This module keeps the send API, the queries and how the connection ends.

What it enforces, and why:

* RFC 9113 framing and stream states (the :mod:`~ztunnel.hbone.http2.streams`
  table); unknown frame types are skipped, PRIORITY is checked and ignored, a
  stream depending on itself is a stream error (section 5.3.1), PUSH_PROMISE
  is a protocol error (the client advertises ENABLE_PUSH=0).
* Flow control both ways. Receive windows reopen only when the driver calls
  :meth:`~H2Connection.acknowledge_received_data` after the bytes left the
  process, in batches (WINDOW_UPDATE once half a window is due), so nothing
  buffers more than it advertised; a peer overrunning a window gets
  FLOW_CONTROL_ERROR.
* DATA only flows on a stream after a 2xx response: a client cannot send before
  it saw 200, a server cannot before it sent it.
* Abuse budgets from :class:`~ztunnel.hbone.http2.settings.H2Settings`, one per
  cheap frame kind: header block and list size, CONTINUATION count
  (CVE-2024-27316), early stream resets (Rapid Reset, CVE-2023-44487),
  PING/SETTINGS, empty frames, WINDOW_UPDATE, tiny DATA, frames on closed
  streams. Each ends the connection with GOAWAY(ENHANCE_YOUR_CALM).
* A peer's violation never raises: a connection error queues GOAWAY and reports
  :class:`~ztunnel.hbone.http2.events.ConnectionTerminated` (the error is kept
  in :attr:`~H2Connection.error`), a stream error queues RST_STREAM and reports
  :class:`~ztunnel.hbone.http2.events.StreamReset`. Misuse by our own code
  raises :class:`~ztunnel.hbone.errors.LocalProtocolError`.

DATA is the hot path: incoming unpadded DATA is handed out as ``memoryview``
slices of the input as it arrives, and outgoing DATA frames reference the
caller's buffer (only the first TLS-record-sized piece is joined to the frame
header, so the TLS layer never emits a 9-byte record).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence

from ..errors import LocalProtocolError, RemoteProtocolError
from . import frames as fr
from .blocks import HeaderBlocks
from .events import ConnectionTerminated, Event
from .flow import FlowControl
from .frames import ErrorCode, SettingCode
from .hpack_encoder import HeaderEncoder
from .receive import FrameReceiver
from .settings import H2Settings
from .streams import H2Stream, Input, State, StreamStateError, StreamTable
from .violations import ConnError

__all__ = ["H2Connection", "Role"]

_TLS_RECORD = 16_384


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class H2Connection:
    """One HTTP/2 connection, client or server side, without IO."""

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
        self.error: RemoteProtocolError | None = None
        self.closed = False  # no frame is processed or produced any more
        self.goaway_sent = False
        self.goaway_received = False
        # Peer settings: RFC 9113 defaults until its SETTINGS arrive (the
        # receiver updates them).
        self.peer_max_concurrent_streams = fr.MAX_WINDOW
        self.peer_initial_window = fr.DEFAULT_WINDOW
        self.peer_max_frame_size = fr.DEFAULT_MAX_FRAME_SIZE
        # One output list, shared by the parts below and never replaced, so
        # frames keep the order they were produced in.
        self._out: list[bytes | memoryview] = []
        self._table = StreamTable(role is Role.CLIENT, cfg.reset_memory)
        self._streams = self._table.live
        self._flow = FlowControl(cfg, self._out)
        self._encoder = HeaderEncoder()
        self._blocks = HeaderBlocks(cfg)
        self._rx = FrameReceiver(
            self, self._table, self._flow, self._blocks, self._encoder, self._out, clock
        )

    # ================================================================ queries

    def data_to_send(self) -> list[bytes | memoryview]:
        """Everything queued since the last call, in order; write it in one go."""
        out = self._out.copy()
        self._out.clear()
        return out

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def last_processed_stream(self) -> int:
        """The highest peer-initiated stream id seen (the GOAWAY last-stream-id)."""
        return self._table.highest_remote

    @property
    def preface_received(self) -> bool:
        """The peer's preface (its magic, on the server side, and SETTINGS) arrived."""
        return self._rx.preface_received

    @property
    def settings_acknowledged(self) -> bool:
        """Every SETTINGS frame we sent has been acknowledged."""
        return self._rx.settings_unacked == 0

    def stream_state(self, stream_id: int) -> State:
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else State.CLOSED

    def send_window(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` would take on ``stream_id`` right now."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return self._flow.sendable(stream)

    @property
    def can_open_stream(self) -> bool:
        return (
            self.role is Role.CLIENT
            and not self.closed
            and not self.goaway_sent
            and not self.goaway_received
            and len(self._streams) < self.peer_max_concurrent_streams
            and self._table.next_local <= fr.MAX_WINDOW
        )

    # ================================================================ sending

    def initiate(self) -> None:
        """Queue the connection preface: (client magic,) SETTINGS, connection window."""
        cfg = self.settings
        ours = [
            (SettingCode.MAX_CONCURRENT_STREAMS, cfg.max_concurrent_streams),
            (SettingCode.INITIAL_WINDOW_SIZE, cfg.initial_stream_window),
            (SettingCode.MAX_FRAME_SIZE, cfg.max_frame_size),
            (SettingCode.MAX_HEADER_LIST_SIZE, cfg.max_header_list_size),
        ]
        if self.role is Role.CLIENT:
            self._out.append(fr.PREFACE)
            ours.insert(0, (SettingCode.ENABLE_PUSH, 0))
        self._out.append(fr.settings_frame(ours))
        self._rx.settings_unacked += 1
        self._flow.open_connection_window()

    def _stream(self, stream_id: int) -> H2Stream:
        if self.closed:
            raise LocalProtocolError("the HTTP/2 connection is closed")
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        return stream

    def _encode_headers(self, sid: int, headers: Sequence[tuple[str, str]], end: bool) -> None:
        block = self._encoder.encode(headers)
        self._out.append(fr.headers_frames(sid, block, end, self.peer_max_frame_size))

    def send_request(self, headers: Sequence[tuple[str, str]]) -> int:
        """Open a stream with a request (no END_STREAM); returns its stream id."""
        if self.closed or self.role is not Role.CLIENT:
            raise LocalProtocolError("requests are sent by an open client connection")
        if not self.can_open_stream:
            raise LocalProtocolError(
                "no new stream can be opened on this connection (going away, or at the "
                f"peer's limit of {self.peer_max_concurrent_streams} streams)"
            )
        sid = self._table.next_local
        self._table.next_local += 2
        stream = H2Stream(
            sid, self.peer_initial_window, self.settings.initial_stream_window, self._clock()
        )
        stream.local_initiated = True
        stream.apply(Input.SEND_HEADERS)
        self._streams[sid] = stream
        self._encode_headers(sid, headers, False)
        return sid

    def send_response(
        self,
        stream_id: int,
        status: int,
        headers: Sequence[tuple[str, str]] = (),
        end_stream: bool = False,
    ) -> None:
        """Answer a request; a 2xx without END_STREAM opens the tunnel for DATA."""
        stream = self._stream(stream_id)
        if self.role is not Role.SERVER or stream.response_sent:
            raise LocalProtocolError(f"stream {stream_id} cannot take a response")
        if not 200 <= status <= 599:
            raise LocalProtocolError(f"status {status} is not a final status")
        self._local_transition(stream, Input.SEND_HEADERS_END if end_stream else Input.SEND_HEADERS)
        stream.response_sent = True
        stream.tunnel_open = status < 300
        self._encode_headers(stream_id, [(":status", str(status)), *headers], end_stream)

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> int:
        """Send as much of ``data`` as the windows allow; returns how many bytes went.

        END_STREAM is set only when every byte went. Retry the rest after a
        :class:`~ztunnel.hbone.http2.events.WindowUpdated` event. The output
        references ``data``: flush it before the buffer is reused.
        """
        stream = self._stream(stream_id)
        if not stream.tunnel_open:
            raise LocalProtocolError(f"stream {stream_id}: no DATA before a 2xx response")
        if not stream.can_send:
            raise LocalProtocolError(f"stream {stream_id} is {stream.state.value}")
        view = memoryview(data).cast("B")
        total = len(view)
        flow = self._flow
        n = max(0, min(total, stream.send_window, flow.send_window))
        stream.send_window -= n
        flow.send_window -= n
        finish = end_stream and n == total
        out = self._out
        frame = self.peer_max_frame_size
        split = _TLS_RECORD - fr.FRAME_HEADER
        off = 0
        while off < n:
            size = min(frame, n - off)
            head = fr.data_header(size, stream_id, finish and off + size == n)
            if size <= split:
                out.append(head + view[off : off + size])
            else:
                out.append(head + view[off : off + split])
                out.append(view[off + split : off + size])
            off += size
        if finish:
            if total == 0:
                out.append(fr.data_header(0, stream_id, True))
            self._local_transition(stream, Input.SEND_END_STREAM)
        return n

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (an empty DATA frame with END_STREAM)."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM a live stream; a stream that is already gone is left alone."""
        if self.closed:
            return
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        stream.state = State.CLOSED
        self._table.remember_reset(stream_id)
        self._out.append(fr.rst_stream_frame(stream_id, code))

    def acknowledge_received_data(self, stream_id: int, size: int) -> None:
        """``size`` received bytes of ``stream_id`` were delivered: reopen the windows.

        WINDOW_UPDATE frames go out in batches, once half of a window is due. A
        stream that has ended only returns its share of the connection window.
        """
        if self.closed or size <= 0:
            return
        stream = self._streams.get(stream_id)
        if stream is not None and stream.can_receive:
            self._flow.credit_stream(stream, size)
        self._flow.credit_connection(size)

    def send_ping(self, opaque: bytes) -> None:
        if self.closed:
            raise LocalProtocolError("the HTTP/2 connection is closed")
        self._out.append(fr.ping_frame(opaque))

    def close(self, code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Send GOAWAY. NO_ERROR lets open streams finish (graceful shutdown: no new
        streams); any other code ends the connection at once."""
        if self.closed:
            return
        if not self.goaway_sent or code != ErrorCode.NO_ERROR:
            self._send_goaway(code, message)
        if code != ErrorCode.NO_ERROR:
            self.closed = True
            self._streams.clear()

    # ============================================================== receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; returns the events they caused, in order.

        Never raises for anything the peer sends: a connection error shows up as
        a final :class:`ConnectionTerminated` event and GOAWAY in the output.
        """
        return self.receive_some(data)[0]

    def receive_some(
        self, data: bytes | bytearray | memoryview, max_frames: int = 0
    ) -> tuple[list[Event], int]:
        """Like :meth:`receive_data`, stopping after ``max_frames`` frames (0: all).

        Returns the events and how many bytes of ``data`` were used; feed the
        rest later (the driver does, on the next event-loop turn). Once the
        connection is closed every byte counts as used.
        """
        events: list[Event] = []
        view = memoryview(data).cast("B")
        if self.closed:
            return events, len(view)
        try:
            used = self._rx.receive(view, max_frames, events)
        except ConnError as exc:
            self._fail(exc, events)
            used = len(view)
        return events, len(view) if self.closed else used

    # ============================================================== ending

    def _send_goaway(self, code: int, message: str) -> int:
        last = self._table.goaway_last_stream()
        self._out.append(fr.goaway_frame(last, code, message.encode()[:256]))
        self.goaway_sent = True
        return last

    def _fail(self, exc: ConnError, events: list[Event]) -> None:
        """A connection error: GOAWAY, every stream gone, nothing more processed."""
        last = self._send_goaway(exc.code, exc.message)
        self.closed = True
        self.error = RemoteProtocolError(exc.message, exc.code)
        self._streams.clear()
        self._blocks.drop()
        events.append(ConnectionTerminated(exc.code, last, False, True, exc.message))

    def _local_transition(self, stream: H2Stream, inp: Input) -> None:
        try:
            stream.apply(inp)
        except StreamStateError as exc:
            raise LocalProtocolError(f"stream {stream.stream_id}: {exc.message}") from None
        if stream.state is State.CLOSED:
            del self._streams[stream.stream_id]
