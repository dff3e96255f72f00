"""The receive side of an HTTP/2 connection: what every frame from the peer means.

:class:`FrameReceiver` is the :class:`~ztunnel.hbone.http2.decoder.FrameSink`
of one :class:`~ztunnel.hbone.http2.connection.H2Connection`, which holds it
and shares with it the stream table, the flow control and the output list.
For each frame header it runs the checks that need only the header (sizes,
the preface, the abuse budgets) and tells the decoder whether to buffer,
skip or stream the body; for each frame it applies the frame to the shared
state and reports :mod:`events <ztunnel.hbone.http2.events>`.

A peer's stream error becomes RST_STREAM and a
:class:`~ztunnel.hbone.http2.events.StreamReset` here; a connection error is
raised as :class:`~ztunnel.hbone.http2.violations.ConnError` for the
connection to turn into GOAWAY. The budgets are spent here because only the
receive side sees the cheap frames they bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

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
from .flow import FlowControl
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
from .settings import Budget
from .streams import H2Stream, Input, State, StreamStateError, StreamTable
from .violations import ConnError, StreamError

if TYPE_CHECKING:
    from .connection import H2Connection

__all__ = ["FrameReceiver"]

_MAX_SETTINGS_PER_FRAME = 64
_MAX_GOAWAY_DEBUG = 16_384
_LARGE_DATA = 1024  # DATA on a closed stream at least this big is not a cheap frame
_FIXED_LENGTH = {FrameType.PING: 8, FrameType.WINDOW_UPDATE: 4, FrameType.RST_STREAM: 4}
_KNOWN = frozenset(int(t) for t in FrameType)


def _per_second(limit: int) -> Budget:
    return Budget(limit, limit)


class FrameReceiver:
    """Applies the peer's frames to one connection; see the module docstring.

    ``conn`` is the connection that holds this receiver: its public flags
    (``closed``, ``goaway_*``) and the peer's settings (``peer_*``) are read
    and updated here, as the frames that change them arrive.
    """

    def __init__(
        self,
        conn: H2Connection,
        table: StreamTable,
        flow: FlowControl,
        blocks: HeaderBlocks,
        encoder: HeaderEncoder,
        out: list[bytes | memoryview],
        clock: Callable[[], float],
    ) -> None:
        cfg = conn.settings
        self.settings = cfg
        self._conn = conn
        self._client = table.local_odd
        self._clock = clock
        self._table = table
        self._streams = table.live
        self._flow = flow
        self._blocks = blocks
        self._encoder = encoder
        self._out = out
        self._decoder = FrameDecoder(self, expect_preface=not self._client)
        self.preface_received = False  # the peer's first frame (SETTINGS) arrived
        self.settings_unacked = 0  # SETTINGS frames we sent and the peer has not acked
        self.events: list[Event] = []  # of the receive() call under way
        self._windows_signalled: set[int] = set()  # WindowUpdated already in events
        self._data_sid = 0  # the DATA frame being streamed in
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

    @property
    def closed(self) -> bool:
        """Decoding stops as soon as the connection is closed."""
        return self._conn.closed

    def receive(self, view: memoryview, max_frames: int, events: list[Event]) -> int:
        """Decode ``view`` (at most ``max_frames`` frames, 0: all) into ``events``.

        Returns how many bytes were used; raises :class:`ConnError` for a
        connection error, after the events that came before it.
        """
        self.events = events
        try:
            return self._decoder.feed(view, max_frames)
        finally:
            self.events = []
            self._windows_signalled.clear()

    # --- decoder callbacks (FrameSink)

    def on_frame_header(self, length: int, ftype: int, flags: int, sid: int) -> int:
        """Checks that need only the frame header; tells the decoder what to do next."""
        cfg = self.settings
        if length > cfg.max_frame_size:
            raise ConnError(
                ErrorCode.FRAME_SIZE_ERROR,
                f"a {length}-byte frame exceeds our SETTINGS_MAX_FRAME_SIZE {cfg.max_frame_size}",
            )
        if not self.preface_received:
            if ftype != FrameType.SETTINGS or flags & FLAG_ACK:
                raise ConnError(ErrorCode.PROTOCOL_ERROR, "the peer's first frame must be SETTINGS")
            self.preface_received = True
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
                self.events.append(DataReceived(self._data_sid, chunk))
            else:  # reset by us while the frame was arriving
                self._flow.credit_connection(len(chunk))
        if last:
            self._data_done()

    # --- budgets and errors

    def _spend(self, budget: Budget, what: str) -> None:
        if budget.spend(self._clock()):
            raise ConnError(ErrorCode.ENHANCE_YOUR_CALM, f"too many {what}")

    def _stream_error(self, exc: StreamError) -> None:
        stream = self._streams.pop(exc.stream_id, None)
        self._table.remember_reset(exc.stream_id)
        self._out.append(fr.rst_stream_frame(exc.stream_id, exc.code))
        if stream is not None:
            stream.state = State.CLOSED
            self.events.append(StreamReset(exc.stream_id, exc.code, False))

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

    # --- DATA

    def _accept_data(self, length: int, end: bool, sid: int) -> bool:
        """Flow control, budgets and stream checks of a DATA frame. True: deliver it."""
        if sid == 0:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        self._flow.receive_connection(length)
        if not end:
            if length == 0:
                self._spend(self._empty_budget, "frames without content")
            elif length < self.settings.tiny_data_size:
                self._spend(self._tiny_budget, "tiny DATA frames")
        stream = self._streams.get(sid)
        try:
            if stream is None:
                if self._table.is_idle(sid):
                    raise ConnError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
                if length < _LARGE_DATA:
                    self._spend(self._closed_budget, "frames on closed streams")
                if sid not in self._table.recently_reset:
                    raise StreamError(sid, ErrorCode.STREAM_CLOSED, "DATA on a closed stream")
            elif not stream.can_receive:
                raise StreamError(sid, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")
            elif self._client and not stream.response_received:
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
        self._flow.credit_connection(length)
        return False

    def _data_done(self) -> None:
        stream = self._streams.get(self._data_sid)
        if self._data_end and self._data_deliver and stream is not None:
            try:
                self._remote_transition(stream, Input.RECV_END_STREAM)
            except StreamError as exc:
                self._stream_error(exc)
                return
            self.events.append(StreamEnded(self._data_sid))

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
        self._flow.credit_stream(stream, pad)
        self._flow.credit_connection(pad)
        if payload:
            self.events.append(DataReceived(sid, payload))
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
            if not self._table.is_local_id(sid) and sid > self._table.highest_remote:
                self._table.highest_remote = sid  # the id is used up, like any refused stream
            raise StreamError(sid, ErrorCode.PROTOCOL_ERROR, "a stream cannot depend on itself")
        if not self._client:
            self._on_request_headers(sid, block.fields, block.end_stream)
        else:
            self._on_response_headers(sid, block.fields, block.end_stream)

    def _trailers(self, stream: H2Stream, end_stream: bool) -> None:
        if not end_stream:
            raise StreamError(stream.stream_id, ErrorCode.PROTOCOL_ERROR, "HEADERS inside a stream")
        self._remote_transition(stream, Input.RECV_HEADERS_END)
        self.events.append(StreamEnded(stream.stream_id))

    def _closed_stream_headers(self, sid: int) -> None:
        if self._table.is_idle(sid):
            raise ConnError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
        if sid not in self._table.recently_reset:
            raise ConnError(ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        self._spend(self._closed_budget, "frames on closed streams")

    def _on_request_headers(self, sid: int, raw: list[tuple[bytes, bytes]], end: bool) -> None:
        if self._table.is_local_id(sid):
            raise ConnError(ErrorCode.PROTOCOL_ERROR, f"clients must use odd stream ids, not {sid}")
        stream = self._streams.get(sid)
        if stream is not None:
            self._trailers(stream, end)
            return
        if sid <= self._table.highest_remote:
            self._closed_stream_headers(sid)
            return
        self._table.highest_remote = sid
        if self._conn.goaway_sent:
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
            sid, self._conn.peer_initial_window, self.settings.initial_stream_window, self._clock()
        )
        self._streams[sid] = stream
        stream.apply(Input.RECV_HEADERS_END if end else Input.RECV_HEADERS)
        self.events.append(RequestReceived(sid, headers, end))
        if end:
            self.events.append(StreamEnded(sid))

    def _on_response_headers(self, sid: int, raw: list[tuple[bytes, bytes]], end: bool) -> None:
        if not self._table.is_local_id(sid):
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
        self.events.append(ResponseReceived(sid, status, headers, end))
        if end:
            self.events.append(StreamEnded(sid))

    # --- control frames

    def _on_priority(self, flags: int, sid: int, body: Body) -> None:
        # Priorities are ignored (RFC 9113 deprecates the scheme), but the one
        # rule left about them is still checked: section 5.3.1.
        if fr.parse_u32(body) & fr.MAX_WINDOW == sid:
            raise StreamError(sid, ErrorCode.PROTOCOL_ERROR, "a stream cannot depend on itself")

    def _on_rst_stream(self, flags: int, sid: int, body: Body) -> None:
        if sid == 0 or self._table.is_idle(sid):
            raise ConnError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        stream = self._streams.pop(sid, None)
        if stream is None:
            self._spend(self._closed_budget, "frames on closed streams")
            return
        stream.state = State.CLOSED
        self._table.remember_reset(sid)
        self.events.append(StreamReset(sid, fr.parse_u32(body), True))
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
            if not self.settings_unacked:
                raise ConnError(ErrorCode.PROTOCOL_ERROR, "SETTINGS ACK without pending SETTINGS")
            self.settings_unacked -= 1
            return
        self._spend(self._control_budget, "SETTINGS and PING frames")
        for code, value in fr.parse_settings(body):
            if code == SettingCode.HEADER_TABLE_SIZE:
                self._encoder.peer_table_size_changed()
            elif code == SettingCode.ENABLE_PUSH:
                if value > 1 or (value and self._client):
                    raise ConnError(
                        ErrorCode.PROTOCOL_ERROR, f"invalid SETTINGS_ENABLE_PUSH {value}"
                    )
            elif code == SettingCode.MAX_CONCURRENT_STREAMS:
                self._conn.peer_max_concurrent_streams = value
            elif code == SettingCode.INITIAL_WINDOW_SIZE:
                self._apply_initial_window(value)
            elif code == SettingCode.MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME_SIZE <= value <= fr.MAX_FRAME_SIZE_LIMIT:
                    raise ConnError(
                        ErrorCode.PROTOCOL_ERROR, f"invalid SETTINGS_MAX_FRAME_SIZE {value}"
                    )
                self._conn.peer_max_frame_size = value
        self._out.append(fr.settings_ack_frame())
        self.events.append(
            RemoteSettingsChanged(
                self._conn.peer_max_concurrent_streams,
                self._conn.peer_initial_window,
                self._conn.peer_max_frame_size,
            )
        )

    def _apply_initial_window(self, value: int) -> None:
        if value > fr.MAX_WINDOW:
            raise ConnError(
                ErrorCode.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} too large"
            )
        delta = value - self._conn.peer_initial_window
        self._conn.peer_initial_window = value
        self._flow.shift_stream_windows(self._streams, delta)

    def _on_ping(self, flags: int, sid: int, body: Body) -> None:
        if sid:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        self._spend(self._control_budget, "SETTINGS and PING frames")
        if flags & FLAG_ACK:
            self.events.append(PingAcked(bytes(body)))
        else:
            self._out.append(fr.ping_frame(bytes(body), ack=True))

    def _on_goaway(self, flags: int, sid: int, body: Body) -> None:
        if sid:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        last, code, debug = fr.parse_goaway(body)
        self._conn.goaway_received = True
        for stream_id in [s for s, st in self._streams.items() if st.local_initiated and s > last]:
            del self._streams[stream_id]
            self.events.append(StreamReset(stream_id, ErrorCode.REFUSED_STREAM, True))
        fatal = code != ErrorCode.NO_ERROR
        if fatal:
            self._conn.closed = True
            self._streams.clear()
        message = debug[:256].decode("utf-8", "replace")
        self.events.append(ConnectionTerminated(code, last, True, fatal, message))

    def _on_window_update(self, flags: int, sid: int, body: Body) -> None:
        inc = fr.parse_u32(body) & fr.MAX_WINDOW
        if sid == 0:
            self._flow.peer_connection_update(inc)
            self._window_updated(0)
            return
        if self._table.is_idle(sid):
            raise ConnError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        stream = self._streams.get(sid)
        if stream is None:
            self._spend(self._closed_budget, "frames on closed streams")
            return
        self._flow.peer_stream_update(stream, inc)
        self._window_updated(sid)

    def _window_updated(self, sid: int) -> None:
        # One event per stream and batch is enough to wake its sender; a peer
        # sending thousands of WINDOW_UPDATEs must not cost the driver as many.
        if sid not in self._windows_signalled:
            self._windows_signalled.add(sid)
            self.events.append(WindowUpdated(sid))


_Handler = Callable[[FrameReceiver, int, int, Body], None]
_HANDLERS: dict[int, _Handler] = {
    FrameType.DATA: FrameReceiver._on_padded_data,
    FrameType.HEADERS: FrameReceiver._on_headers,
    FrameType.CONTINUATION: FrameReceiver._on_continuation,
    FrameType.PRIORITY: FrameReceiver._on_priority,
    FrameType.RST_STREAM: FrameReceiver._on_rst_stream,
    FrameType.SETTINGS: FrameReceiver._on_settings,
    FrameType.PING: FrameReceiver._on_ping,
    FrameType.GOAWAY: FrameReceiver._on_goaway,
    FrameType.WINDOW_UPDATE: FrameReceiver._on_window_update,
}
