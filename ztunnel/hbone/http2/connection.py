"""A sans-IO HTTP/2 connection for exactly what HBONE needs: CONNECT tunnels.

:class:`H2Connection` takes bytes (:meth:`~H2Connection.receive_data`) and
calls (send a request, a response, data, a reset...) and produces bytes
(:meth:`~H2Connection.data_to_send`) and :mod:`events
<ztunnel.hbone.http2.events>`. It never touches a socket, and reads time only
through the clock it is given, so every exchange can be scripted in a unit
test. :class:`~ztunnel.hbone.http2.decoder.FrameDecoder` splits the bytes into
frames; everything a frame means is decided here.

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
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..errors import LocalProtocolError, RemoteProtocolError
from . import frames as fr
from .blocks import HeaderBlock, HeaderBlocks
from .decoder import BUFFER, SKIP, STREAM, Body, FrameDecoder
from .events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAcked,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from .frames import (
    FLAG_ACK,
    FLAG_END_STREAM,
    FLAG_PADDED,
    ErrorCode,
    FrameType,
    SettingCode,
)
from .headers import MalformedHeaders, validate_request, validate_response
from .hpack_encoder import HeaderEncoder
from .settings import Budget, H2Settings
from .streams import H2Stream, Input, State, StreamStateError
from .violations import ConnError, StreamError

__all__ = ["H2Connection", "Role"]

_TLS_RECORD = 16_384
_MAX_SETTINGS_PER_FRAME = 64
_MAX_GOAWAY_DEBUG = 16_384
_LARGE_DATA = 1024  # DATA on a closed stream at least this big is not a cheap frame
_FIXED_LENGTH = {FrameType.PING: 8, FrameType.WINDOW_UPDATE: 4, FrameType.RST_STREAM: 4}
_KNOWN = frozenset(int(t) for t in FrameType)


def _per_second(limit: int) -> Budget:
    return Budget(limit, limit)


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
        self._frames = FrameDecoder(self, expect_preface=role is Role.SERVER)
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

    # ================================================================ queries

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

    @property
    def preface_received(self) -> bool:
        """The peer's preface (its magic, on the server side, and SETTINGS) arrived."""
        return not self._first_frame

    @property
    def settings_acknowledged(self) -> bool:
        """Every SETTINGS frame we sent has been acknowledged."""
        return self._settings_unacked == 0

    def stream_state(self, stream_id: int) -> State:
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else State.CLOSED

    def send_window(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` would take on ``stream_id`` right now."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, min(stream.send_window, self._conn_send_window))

    @property
    def can_open_stream(self) -> bool:
        return (
            self.role is Role.CLIENT
            and not self.closed
            and not self.goaway_sent
            and not self.goaway_received
            and len(self._streams) < self.peer_max_concurrent_streams
            and self._next_local <= fr.MAX_WINDOW
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
        self._settings_unacked += 1
        grow = cfg.connection_window - fr.DEFAULT_WINDOW
        if grow > 0:
            self._out.append(fr.window_update_frame(0, grow))
            self._conn_recv_window += grow

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
        sid = self._next_local
        self._next_local += 2
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
        n = max(0, min(total, stream.send_window, self._conn_send_window))
        stream.send_window -= n
        self._conn_send_window -= n
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
        self._remember_reset(stream_id)
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
            self._credit_stream(stream, size)
        self._credit_connection(size)

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
        self._events = events
        try:
            used = self._frames.feed(view, max_frames)
        except ConnError as exc:
            self._fail(exc)
            used = len(view)
        finally:
            self._events = []
            self._windows_signalled.clear()
        return events, len(view) if self.closed else used

    # --- decoder callbacks (FrameSink)

    def on_frame_header(self, length: int, ftype: int, flags: int, sid: int) -> int:
        """Checks that need only the frame header; tells the decoder what to do next."""
        cfg = self.settings
        if length > cfg.max_frame_size:
            raise ConnError(
                ErrorCode.FRAME_SIZE_ERROR,
                f"a {length}-byte frame exceeds our SETTINGS_MAX_FRAME_SIZE {cfg.max_frame_size}",
            )
        if self._first_frame:
            if ftype != FrameType.SETTINGS or flags & FLAG_ACK:
                raise ConnError(ErrorCode.PROTOCOL_ERROR, "the peer's first frame must be SETTINGS")
            self._first_frame = False
        if self._blocks.pending:
            self._blocks.check_next(length, ftype, sid)
            return BUFFER
        if ftype == FrameType.DATA:
            if flags & FLAG_PADDED:
                return BUFFER
            end = bool(flags & FLAG_END_STREAM)
            self._data_sid, self._data_end = sid, end
            self._data_deliver = self._accept_data(length, end, sid)
            if length == 0:
                self._data_done()
                return SKIP
            return STREAM
        if ftype == FrameType.HEADERS:
            self._blocks.check_headers_length(length)
            return BUFFER
        if ftype == FrameType.CONTINUATION:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without a preceding HEADERS")
        if ftype == FrameType.PUSH_PROMISE:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE is refused: push is disabled")
        if ftype == FrameType.PRIORITY:
            if sid == 0 or length != 5:
                raise ConnError(ErrorCode.PROTOCOL_ERROR, "PRIORITY must be 5 bytes on a stream")
            self._spend(self._empty_budget, "frames without content")
            return BUFFER
        if ftype not in _KNOWN:
            # RFC 9113 section 4.1: unknown frame types are ignored.
            self._spend(self._empty_budget, "frames without content")
            return SKIP
        expected = _FIXED_LENGTH.get(FrameType(ftype))
        if expected is not None and length != expected:
            raise ConnError(
                ErrorCode.FRAME_SIZE_ERROR, f"{FrameType(ftype).name} must be {expected} bytes"
            )
        if ftype == FrameType.WINDOW_UPDATE:
            self._spend(self._window_budget, "WINDOW_UPDATE frames")
        elif ftype == FrameType.SETTINGS:
            if sid:
                raise ConnError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
            if (flags & FLAG_ACK and length) or length % 6:
                raise ConnError(ErrorCode.FRAME_SIZE_ERROR, "malformed SETTINGS length")
            if length > 6 * _MAX_SETTINGS_PER_FRAME:
                raise ConnError(ErrorCode.ENHANCE_YOUR_CALM, "SETTINGS frame with too many entries")
        elif ftype == FrameType.GOAWAY and not 8 <= length <= 8 + _MAX_GOAWAY_DEBUG:
            raise ConnError(ErrorCode.FRAME_SIZE_ERROR, "malformed GOAWAY length")
        return BUFFER

    def on_frame(self, ftype: int, flags: int, sid: int, body: Body) -> None:
        try:
            _HANDLERS[ftype](self, flags, sid, body)
        except StreamError as exc:
            self._stream_error(exc)

    def on_data_chunk(self, chunk: memoryview, last: bool) -> None:
        if self._data_deliver:
            stream = self._streams.get(self._data_sid)
            if stream is not None and stream.can_receive:
                self._events.append(DataReceived(self._data_sid, chunk))
            else:  # reset by us while the frame was arriving
                self._credit_connection(len(chunk))
        if last:
            self._data_done()

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

    # --- DATA

    def _accept_data(self, length: int, end: bool, sid: int) -> bool:
        """Flow control, budgets and stream checks of a DATA frame. True: deliver it."""
        if sid == 0:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self._conn_recv_window:
            raise ConnError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._conn_recv_window -= length
        if not end:
            if length == 0:
                self._spend(self._empty_budget, "frames without content")
            elif length < self.settings.tiny_data_size:
                self._spend(self._tiny_budget, "tiny DATA frames")
        stream = self._streams.get(sid)
        try:
            if stream is None:
                if self._is_idle(sid):
                    raise ConnError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
                if length < _LARGE_DATA:
                    self._spend(self._closed_budget, "frames on closed streams")
                if sid not in self._recently_reset:
                    raise StreamError(sid, ErrorCode.STREAM_CLOSED, "DATA on a closed stream")
            elif not stream.can_receive:
                raise StreamError(sid, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")
            elif self.role is Role.CLIENT and not stream.response_received:
                raise StreamError(sid, ErrorCode.PROTOCOL_ERROR, "DATA before the response")
            elif length > stream.recv_window:
                raise StreamError(
                    sid, ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the stream window"
                )
            else:
                stream.recv_window -= length
                return True
        except StreamError as exc:
            self._stream_error(exc)
        # Not delivered: the connection window is returned at once.
        self._credit_connection(length)
        return False

    def _data_done(self) -> None:
        stream = self._streams.get(self._data_sid)
        if self._data_end and self._data_deliver and stream is not None:
            try:
                self._remote_transition(stream, Input.RECV_END_STREAM)
            except StreamError as exc:
                self._stream_error(exc)
                return
            self._events.append(StreamEnded(self._data_sid))

    def _on_padded_data(self, flags: int, sid: int, body: Body) -> None:
        length = len(body)
        if length == 0 or body[0] >= length:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "DATA padding is not shorter than the frame")
        end = bool(flags & FLAG_END_STREAM)
        deliver = self._accept_data(length, end, sid)
        payload = memoryview(body)[1 : length - body[0]]
        if not deliver:
            return
        stream = self._streams[sid]
        # Padding never reaches the driver, so its window share is returned now.
        pad = length - len(payload)
        self._credit_stream(stream, pad)
        self._credit_connection(pad)
        if payload:
            self._events.append(DataReceived(sid, payload))
        self._data_sid, self._data_end, self._data_deliver = sid, end, True
        self._data_done()

    # --- HEADERS

    def _on_headers(self, flags: int, sid: int, body: Body) -> None:
        block = self._blocks.headers(flags, sid, body)
        if block is not None:
            self._on_block(block)

    def _on_continuation(self, flags: int, sid: int, body: Body) -> None:
        block = self._blocks.continuation(flags, body)
        if block is not None:
            self._on_block(block)

    def _on_block(self, block: HeaderBlock) -> None:
        sid = block.stream_id
        if block.self_dependent:
            if not self._is_local_id(sid) and sid > self._highest_remote:
                self._highest_remote = sid  # the id is used up, like any refused stream
            raise StreamError(sid, ErrorCode.PROTOCOL_ERROR, "a stream cannot depend on itself")
        if self.role is Role.SERVER:
            self._on_request_headers(sid, block.fields, block.end_stream)
        else:
            self._on_response_headers(sid, block.fields, block.end_stream)

    def _trailers(self, stream: H2Stream, end_stream: bool) -> None:
        if not end_stream:
            raise StreamError(stream.stream_id, ErrorCode.PROTOCOL_ERROR, "HEADERS inside a stream")
        self._remote_transition(stream, Input.RECV_HEADERS_END)
        self._events.append(StreamEnded(stream.stream_id))

    def _closed_stream_headers(self, sid: int) -> None:
        if self._is_idle(sid):
            raise ConnError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
        if sid not in self._recently_reset:
            raise ConnError(ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        self._spend(self._closed_budget, "frames on closed streams")

    def _on_request_headers(self, sid: int, raw: list[tuple[bytes, bytes]], end: bool) -> None:
        if self._is_local_id(sid):
            raise ConnError(ErrorCode.PROTOCOL_ERROR, f"clients must use odd stream ids, not {sid}")
        stream = self._streams.get(sid)
        if stream is not None:
            self._trailers(stream, end)
            return
        if sid <= self._highest_remote:
            self._closed_stream_headers(sid)
            return
        self._highest_remote = sid
        if self.goaway_sent:
            raise StreamError(sid, ErrorCode.REFUSED_STREAM, "the server is going away")
        if len(self._streams) >= self.settings.max_concurrent_streams:
            # A refused stream did no work for its sender either: count it with
            # early resets, or a HEADERS flood would buy one RST_STREAM each.
            self._spend(self._early_resets, "streams beyond the limit")
            raise StreamError(sid, ErrorCode.REFUSED_STREAM, "too many concurrent streams")
        try:
            headers = validate_request(raw)
        except MalformedHeaders as exc:
            raise StreamError(sid, ErrorCode.PROTOCOL_ERROR, exc.message) from None
        stream = H2Stream(
            sid, self.peer_initial_window, self.settings.initial_stream_window, self._clock()
        )
        self._streams[sid] = stream
        stream.apply(Input.RECV_HEADERS_END if end else Input.RECV_HEADERS)
        self._events.append(RequestReceived(sid, headers, end))
        if end:
            self._events.append(StreamEnded(sid))

    def _on_response_headers(self, sid: int, raw: list[tuple[bytes, bytes]], end: bool) -> None:
        if not self._is_local_id(sid):
            raise ConnError(
                ErrorCode.PROTOCOL_ERROR, f"server-initiated stream {sid}; push is disabled"
            )
        stream = self._streams.get(sid)
        if stream is None:
            self._closed_stream_headers(sid)
            return
        if not stream.can_receive:
            raise StreamError(sid, ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM")
        if stream.response_received:
            self._trailers(stream, end)
            return
        try:
            status, headers = validate_response(raw)
        except MalformedHeaders as exc:
            raise StreamError(sid, ErrorCode.PROTOCOL_ERROR, exc.message) from None
        if status < 200:
            if end or status == 101 or status < 100:
                raise StreamError(
                    sid, ErrorCode.PROTOCOL_ERROR, f"invalid informational status {status}"
                )
            return  # 1xx: the final response is still to come
        stream.response_received = True
        stream.tunnel_open = status < 300
        self._remote_transition(stream, Input.RECV_HEADERS_END if end else Input.RECV_HEADERS)
        self._events.append(ResponseReceived(sid, status, headers, end))
        if end:
            self._events.append(StreamEnded(sid))

    # --- control frames

    def _on_priority(self, flags: int, sid: int, body: Body) -> None:
        # Priorities are ignored (RFC 9113 deprecates the scheme), but the one
        # rule left about them is still checked: section 5.3.1.
        if fr.parse_u32(body) & fr.MAX_WINDOW == sid:
            raise StreamError(sid, ErrorCode.PROTOCOL_ERROR, "a stream cannot depend on itself")

    def _on_rst_stream(self, flags: int, sid: int, body: Body) -> None:
        if sid == 0 or self._is_idle(sid):
            raise ConnError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        stream = self._streams.pop(sid, None)
        if stream is None:
            self._spend(self._closed_budget, "frames on closed streams")
            return
        stream.state = State.CLOSED
        self._remember_reset(sid)
        self._events.append(StreamReset(sid, fr.parse_u32(body), True))
        if not stream.local_initiated:
            now = self._clock()
            early = (
                not stream.response_sent or now - stream.opened_at < self.settings.early_reset_age
            )
            if early and self._early_resets.spend(now):
                raise ConnError(
                    ErrorCode.ENHANCE_YOUR_CALM, "too many streams reset right after opening"
                )

    def _on_settings(self, flags: int, sid: int, body: Body) -> None:
        if flags & FLAG_ACK:
            if not self._settings_unacked:
                raise ConnError(ErrorCode.PROTOCOL_ERROR, "SETTINGS ACK without pending SETTINGS")
            self._settings_unacked -= 1
            return
        self._spend(self._control_budget, "SETTINGS and PING frames")
        for code, value in fr.parse_settings(body):
            if code == SettingCode.HEADER_TABLE_SIZE:
                self._encoder.peer_table_size_changed()
            elif code == SettingCode.ENABLE_PUSH:
                if value > 1 or (value and self.role is Role.CLIENT):
                    raise ConnError(
                        ErrorCode.PROTOCOL_ERROR, f"invalid SETTINGS_ENABLE_PUSH {value}"
                    )
            elif code == SettingCode.MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif code == SettingCode.INITIAL_WINDOW_SIZE:
                self._apply_initial_window(value)
            elif code == SettingCode.MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME_SIZE <= value <= fr.MAX_FRAME_SIZE_LIMIT:
                    raise ConnError(
                        ErrorCode.PROTOCOL_ERROR, f"invalid SETTINGS_MAX_FRAME_SIZE {value}"
                    )
                self.peer_max_frame_size = value
        self._out.append(fr.settings_ack_frame())
        self._events.append(
            RemoteSettingsChanged(
                self.peer_max_concurrent_streams, self.peer_initial_window, self.peer_max_frame_size
            )
        )

    def _apply_initial_window(self, value: int) -> None:
        if value > fr.MAX_WINDOW:
            raise ConnError(
                ErrorCode.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} too large"
            )
        delta = value - self.peer_initial_window
        self.peer_initial_window = value
        for stream in self._streams.values():
            stream.send_window += delta
            if stream.send_window > fr.MAX_WINDOW:
                raise ConnError(ErrorCode.FLOW_CONTROL_ERROR, "a stream window grew past 2^31-1")

    def _on_ping(self, flags: int, sid: int, body: Body) -> None:
        if sid:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        self._spend(self._control_budget, "SETTINGS and PING frames")
        if flags & FLAG_ACK:
            self._events.append(PingAcked(bytes(body)))
        else:
            self._out.append(fr.ping_frame(bytes(body), ack=True))

    def _on_goaway(self, flags: int, sid: int, body: Body) -> None:
        if sid:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        last, code, debug = fr.parse_goaway(body)
        self.goaway_received = True
        for stream_id in [s for s, st in self._streams.items() if st.local_initiated and s > last]:
            del self._streams[stream_id]
            self._events.append(StreamReset(stream_id, ErrorCode.REFUSED_STREAM, True))
        fatal = code != ErrorCode.NO_ERROR
        if fatal:
            self.closed = True
            self._streams.clear()
        message = debug[:256].decode("utf-8", "replace")
        self._events.append(ConnectionTerminated(code, last, True, fatal, message))

    def _on_window_update(self, flags: int, sid: int, body: Body) -> None:
        inc = fr.parse_u32(body) & fr.MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise ConnError(ErrorCode.PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
            self._conn_send_window += inc
            if self._conn_send_window > fr.MAX_WINDOW:
                raise ConnError(ErrorCode.FLOW_CONTROL_ERROR, "connection window grew past 2^31-1")
            self._window_updated(0)
            return
        if self._is_idle(sid):
            raise ConnError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        stream = self._streams.get(sid)
        if stream is None:
            self._spend(self._closed_budget, "frames on closed streams")
            return
        if inc == 0:
            raise StreamError(sid, ErrorCode.PROTOCOL_ERROR, "stream WINDOW_UPDATE of 0")
        stream.send_window += inc
        if stream.send_window > fr.MAX_WINDOW:
            raise StreamError(sid, ErrorCode.FLOW_CONTROL_ERROR, "stream window grew past 2^31-1")
        self._window_updated(sid)

    def _window_updated(self, sid: int) -> None:
        # One event per stream and batch is enough to wake its sender; a peer
        # sending thousands of WINDOW_UPDATEs must not cost the driver as many.
        if sid not in self._windows_signalled:
            self._windows_signalled.add(sid)
            self._events.append(WindowUpdated(sid))


_Handler = Callable[[H2Connection, int, int, Body], None]
_HANDLERS: dict[int, _Handler] = {
    FrameType.DATA: H2Connection._on_padded_data,
    FrameType.HEADERS: H2Connection._on_headers,
    FrameType.CONTINUATION: H2Connection._on_continuation,
    FrameType.PRIORITY: H2Connection._on_priority,
    FrameType.RST_STREAM: H2Connection._on_rst_stream,
    FrameType.SETTINGS: H2Connection._on_settings,
    FrameType.PING: H2Connection._on_ping,
    FrameType.GOAWAY: H2Connection._on_goaway,
    FrameType.WINDOW_UPDATE: H2Connection._on_window_update,
}
