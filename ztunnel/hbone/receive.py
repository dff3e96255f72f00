"""The receive half of the sans-IO HTTP/2 connection: frame decoding and checks.

:class:`H2Receiver` turns peer bytes into events. The decoder works on the
caller's buffer: complete frames are read in place, only a frame split across
two reads is copied, and unpadded DATA payloads are streamed out as slices as
soon as they arrive. Every check a peer can fail is here, with the error RFC
9113 prescribes (connection error -> GOAWAY, stream error -> RST_STREAM).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import hpack

from . import frames as fr
from .config import H2Settings
from .core import ConnError, H2Core, Role, StreamError
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
from .headers import MalformedHeaders, validate_request, validate_response
from .streams import H2Stream, Input, State

__all__ = ["H2Receiver"]

E = fr.ErrorCode
T = fr.FrameType


class F:
    """Flag bits as plain ints: IntFlag arithmetic builds enum members on every
    ``&``, which showed up on the per-frame path."""

    END_STREAM = int(fr.Flag.END_STREAM)
    ACK = int(fr.Flag.ACK)
    END_HEADERS = int(fr.Flag.END_HEADERS)
    PADDED = int(fr.Flag.PADDED)
    PRIORITY = int(fr.Flag.PRIORITY)


S = fr.SettingCode
_MAX_SETTINGS_PER_FRAME = 64
_MAX_GOAWAY_DEBUG = 16_384
_FIXED_LENGTH = {T.PING: 8, T.WINDOW_UPDATE: 4, T.RST_STREAM: 4}
_KNOWN = frozenset(int(t) for t in T)
Body = bytes | memoryview


class H2Receiver(H2Core):
    """Frame decoding and the handling of every frame type."""

    def __init__(
        self,
        role: Role,
        settings: H2Settings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(role, settings, clock)
        self._preface_left = fr.PREFACE if self.role is Role.SERVER else b""
        self._first_frame = True
        self._header = bytearray()
        self._frame: tuple[int, int, int] | None = None  # (type, flags, stream) of _body
        self._body_len = 0
        self._body = bytearray()
        self._skip = 0  # body bytes to discard
        self._data_left = 0  # streamed DATA payload bytes still to come
        self._data_sid = 0
        self._data_end = False
        self._data_deliver = False
        self._block: bytearray | None = None  # header block waiting for CONTINUATION
        self._block_sid = 0
        self._block_end_stream = False
        self._block_frames = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; returns the events they caused, in order.

        Never raises for anything the peer sends: a connection error shows up as
        a final :class:`ConnectionTerminated` event and GOAWAY in the output.
        """
        events: list[Event] = []
        if self.closed:
            return events
        try:
            self._consume(memoryview(data).cast("B"), events)
        except ConnError as exc:
            self._fail(exc, events)
        return events

    def _consume(self, view: memoryview, events: list[Event]) -> None:
        pos, n = 0, len(view)
        if self._preface_left:
            take = min(len(self._preface_left), n)
            if view[:take] != self._preface_left[:take]:
                raise ConnError(E.PROTOCOL_ERROR, "invalid HTTP/2 connection preface")
            self._preface_left = self._preface_left[take:]
            pos = take
        while pos < n and not self.closed:
            if self._data_left:
                take = min(self._data_left, n - pos)
                self._data_chunk(view[pos : pos + take], events)
                pos += take
            elif self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
            elif self._frame is not None:
                take = min(self._body_len - len(self._body), n - pos)
                self._body += view[pos : pos + take]
                pos += take
                if len(self._body) == self._body_len:
                    ftype, flags, sid = self._frame
                    self._frame = None
                    body = bytes(self._body)
                    self._body.clear()
                    self._dispatch(ftype, flags, sid, body, events)
            else:
                if self._header or n - pos < fr.FRAME_HEADER:
                    take = min(fr.FRAME_HEADER - len(self._header), n - pos)
                    self._header += view[pos : pos + take]
                    pos += take
                    if len(self._header) < fr.FRAME_HEADER:
                        return
                    length, ftype, flags, sid = fr.unpack_header(self._header)
                    self._header.clear()
                else:
                    length, ftype, flags, sid = fr.unpack_header(view, pos)
                    pos += fr.FRAME_HEADER
                if not self._begin(length, ftype, flags, sid, events):
                    continue
                if n - pos >= length:
                    self._dispatch(ftype, flags, sid, view[pos : pos + length], events)
                    pos += length
                else:
                    self._frame = (ftype, flags, sid)
                    self._body_len = length
                    self._body += view[pos:]
                    pos = n

    def _count_empty(self) -> None:
        if self._empty_rate.hit(self._clock()):
            raise ConnError(E.ENHANCE_YOUR_CALM, "too many frames without content")

    def _begin(self, length: int, ftype: int, flags: int, sid: int, events: list[Event]) -> bool:
        """Checks that need only the frame header. True: buffer the body and dispatch."""
        cfg = self.settings
        if length > cfg.max_frame_size:
            raise ConnError(
                E.FRAME_SIZE_ERROR,
                f"a {length}-byte frame exceeds our SETTINGS_MAX_FRAME_SIZE {cfg.max_frame_size}",
            )
        if self._first_frame:
            if ftype != T.SETTINGS or flags & F.ACK:
                raise ConnError(E.PROTOCOL_ERROR, "the peer's first frame must be SETTINGS")
            self._first_frame = False
        if self._block is not None:
            if ftype != T.CONTINUATION or sid != self._block_sid:
                raise ConnError(E.PROTOCOL_ERROR, f"expected CONTINUATION on stream {sid}")
            self._block_frames += 1
            if self._block_frames > cfg.max_continuations:
                raise ConnError(E.ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
            if len(self._block) + length > cfg.max_header_block:
                raise ConnError(E.ENHANCE_YOUR_CALM, "header block too large")
            return True
        if ftype == T.DATA:
            if flags & F.PADDED:
                return True
            deliver = self._accept_data(length, flags, sid, events)
            self._data_sid, self._data_end, self._data_deliver = (
                sid,
                bool(flags & F.END_STREAM),
                deliver,
            )
            self._data_left = length
            if length == 0:
                self._data_done(events)
            return False
        if ftype == T.HEADERS:
            if length > cfg.max_header_block + 6 + 256:
                raise ConnError(E.ENHANCE_YOUR_CALM, "header block too large")
            return True
        if ftype == T.CONTINUATION:
            raise ConnError(E.PROTOCOL_ERROR, "CONTINUATION without a preceding HEADERS")
        if ftype == T.PUSH_PROMISE:
            raise ConnError(E.PROTOCOL_ERROR, "PUSH_PROMISE is refused: push is disabled")
        if ftype == T.PRIORITY:
            if sid == 0 or length != 5:
                raise ConnError(E.PROTOCOL_ERROR, "PRIORITY must be 5 bytes on a stream")
            self._count_empty()
            self._skip = length
            return False
        if ftype not in _KNOWN:
            # RFC 9113 section 4.1: unknown frame types are ignored.
            self._count_empty()
            self._skip = length
            return False
        expected = _FIXED_LENGTH.get(T(ftype))
        if expected is not None and length != expected:
            raise ConnError(E.FRAME_SIZE_ERROR, f"{T(ftype).name} must be {expected} bytes")
        if ftype == T.SETTINGS:
            if sid:
                raise ConnError(E.PROTOCOL_ERROR, "SETTINGS on a stream")
            if (flags & F.ACK and length) or length % 6:
                raise ConnError(E.FRAME_SIZE_ERROR, "malformed SETTINGS length")
            if length > 6 * _MAX_SETTINGS_PER_FRAME:
                raise ConnError(E.ENHANCE_YOUR_CALM, "SETTINGS frame with too many entries")
        elif ftype == T.GOAWAY and not 8 <= length <= 8 + _MAX_GOAWAY_DEBUG:
            raise ConnError(E.FRAME_SIZE_ERROR, "malformed GOAWAY length")
        return True

    def _dispatch(self, ftype: int, flags: int, sid: int, body: Body, events: list[Event]) -> None:
        try:
            _HANDLERS[ftype](self, flags, sid, body, events)
        except StreamError as exc:
            self._stream_error(exc, events)

    # --------------------------------------------------------------- DATA

    def _accept_data(self, length: int, flags: int, sid: int, events: list[Event]) -> bool:
        """Flow control and stream checks of a DATA frame. True: deliver the payload."""
        if sid == 0:
            raise ConnError(E.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self._conn_recv_window:
            raise ConnError(E.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._conn_recv_window -= length
        if length == 0 and not flags & F.END_STREAM:
            self._count_empty()
        stream = self._streams.get(sid)
        try:
            if stream is None:
                if self._is_idle(sid):
                    raise ConnError(E.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
                if sid not in self._recently_reset:
                    raise StreamError(sid, E.STREAM_CLOSED, "DATA on a closed stream")
            elif not stream.can_receive:
                raise StreamError(sid, E.STREAM_CLOSED, "DATA after END_STREAM")
            elif self.role is Role.CLIENT and not stream.response_received:
                raise StreamError(sid, E.PROTOCOL_ERROR, "DATA before the response")
            elif length > stream.recv_window:
                raise StreamError(sid, E.FLOW_CONTROL_ERROR, "DATA beyond the stream window")
            else:
                stream.recv_window -= length
                return True
        except StreamError as exc:
            self._stream_error(exc, events)
        # Not delivered: the connection window is returned at once.
        self._credit_connection(length)
        return False

    def _data_chunk(self, chunk: memoryview, events: list[Event]) -> None:
        self._data_left -= len(chunk)
        if self._data_deliver:
            stream = self._streams.get(self._data_sid)
            if stream is not None and stream.can_receive:
                events.append(DataReceived(self._data_sid, chunk))
            else:  # reset by us while the frame was arriving
                self._credit_connection(len(chunk))
        if not self._data_left:
            self._data_done(events)

    def _data_done(self, events: list[Event]) -> None:
        stream = self._streams.get(self._data_sid)
        if self._data_end and self._data_deliver and stream is not None:
            try:
                self._remote_transition(stream, Input.RECV_END_STREAM)
            except StreamError as exc:
                self._stream_error(exc, events)
                return
            events.append(StreamEnded(self._data_sid))

    def _on_padded_data(self, flags: int, sid: int, body: Body, events: list[Event]) -> None:
        length = len(body)
        if length == 0 or body[0] >= length:
            raise ConnError(E.PROTOCOL_ERROR, "DATA padding is not shorter than the frame")
        deliver = self._accept_data(length, flags, sid, events)
        payload = memoryview(body)[1 : length - body[0]]
        if not deliver:
            return
        stream = self._streams[sid]
        # Padding never reaches the driver, so its window share is returned now.
        pad = length - len(payload)
        self._credit_stream(stream, pad)
        self._credit_connection(pad)
        if payload:
            events.append(DataReceived(sid, payload))
        self._data_sid, self._data_end, self._data_deliver = sid, bool(flags & F.END_STREAM), True
        self._data_done(events)

    # ------------------------------------------------------------ HEADERS

    def _on_headers(self, flags: int, sid: int, body: Body, events: list[Event]) -> None:
        if sid == 0:
            raise ConnError(E.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(body)
        if flags & F.PADDED:
            if not body:
                raise ConnError(E.FRAME_SIZE_ERROR, "padded HEADERS without a pad length")
            start, end = 1, end - body[0]
        if flags & F.PRIORITY:
            start += 5
        if start > end:
            raise ConnError(E.PROTOCOL_ERROR, "HEADERS padding exceeds the frame")
        fragment = bytes(body[start:end])
        if len(fragment) > self.settings.max_header_block:
            raise ConnError(E.ENHANCE_YOUR_CALM, "header block too large")
        if flags & F.END_HEADERS:
            self._on_block(sid, fragment, bool(flags & F.END_STREAM), events)
        else:
            self._block = bytearray(fragment)
            self._block_sid, self._block_end_stream, self._block_frames = (
                sid,
                bool(flags & F.END_STREAM),
                0,
            )

    def _on_continuation(self, flags: int, sid: int, body: Body, events: list[Event]) -> None:
        assert self._block is not None  # _begin admits CONTINUATION only after HEADERS
        self._block += body
        if flags & F.END_HEADERS:
            block = bytes(self._block)
            self._block = None
            self._on_block(sid, block, self._block_end_stream, events)

    def _on_block(self, sid: int, block: bytes, end_stream: bool, events: list[Event]) -> None:
        try:
            raw = [(bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True)]
        except hpack.OversizedHeaderListError:
            raise ConnError(E.ENHANCE_YOUR_CALM, "header list too large") from None
        except (hpack.HPACKError, ValueError, IndexError, TypeError) as exc:
            raise ConnError(E.COMPRESSION_ERROR, f"HPACK decoding failed: {exc}") from None
        if self.role is Role.SERVER:
            self._on_request_headers(sid, raw, end_stream, events)
        else:
            self._on_response_headers(sid, raw, end_stream, events)

    def _trailers(self, stream: H2Stream, end_stream: bool, events: list[Event]) -> None:
        if not end_stream:
            raise StreamError(stream.stream_id, E.PROTOCOL_ERROR, "HEADERS inside a stream")
        self._remote_transition(stream, Input.RECV_HEADERS_END)
        events.append(StreamEnded(stream.stream_id))

    def _closed_stream_headers(self, sid: int) -> None:
        if self._is_idle(sid):
            raise ConnError(E.PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
        if sid not in self._recently_reset:
            raise ConnError(E.STREAM_CLOSED, f"HEADERS on closed stream {sid}")

    def _on_request_headers(
        self, sid: int, raw: list[tuple[bytes, bytes]], end_stream: bool, events: list[Event]
    ) -> None:
        if self._is_local_id(sid):
            raise ConnError(E.PROTOCOL_ERROR, f"clients must use odd stream ids, not {sid}")
        stream = self._streams.get(sid)
        if stream is not None:
            self._trailers(stream, end_stream, events)
            return
        if sid <= self._highest_remote:
            self._closed_stream_headers(sid)
            return
        self._highest_remote = sid
        if self.goaway_sent:
            raise StreamError(sid, E.REFUSED_STREAM, "the server is going away")
        if len(self._streams) >= self.settings.max_concurrent_streams:
            # A refused stream did no work for its sender either: count it with
            # early resets, or a HEADERS flood would buy one RST_STREAM each.
            if self._early_resets.hit(self._clock()):
                raise ConnError(E.ENHANCE_YOUR_CALM, "too many streams beyond the limit")
            raise StreamError(sid, E.REFUSED_STREAM, "too many concurrent streams")
        try:
            headers = validate_request(raw)
        except MalformedHeaders as exc:
            raise StreamError(sid, E.PROTOCOL_ERROR, exc.message) from None
        stream = H2Stream(
            sid, self.peer_initial_window, self.settings.initial_stream_window, self._clock()
        )
        self._streams[sid] = stream
        stream.apply(Input.RECV_HEADERS_END if end_stream else Input.RECV_HEADERS)
        events.append(RequestReceived(sid, headers, end_stream))
        if end_stream:
            events.append(StreamEnded(sid))

    def _on_response_headers(
        self, sid: int, raw: list[tuple[bytes, bytes]], end_stream: bool, events: list[Event]
    ) -> None:
        if not self._is_local_id(sid):
            raise ConnError(E.PROTOCOL_ERROR, f"server-initiated stream {sid}; push is disabled")
        stream = self._streams.get(sid)
        if stream is None:
            self._closed_stream_headers(sid)
            return
        if not stream.can_receive:
            raise StreamError(sid, E.STREAM_CLOSED, "HEADERS after END_STREAM")
        if stream.response_received:
            self._trailers(stream, end_stream, events)
            return
        try:
            status, headers = validate_response(raw)
        except MalformedHeaders as exc:
            raise StreamError(sid, E.PROTOCOL_ERROR, exc.message) from None
        if status < 200:
            if end_stream or status == 101 or status < 100:
                raise StreamError(sid, E.PROTOCOL_ERROR, f"invalid informational status {status}")
            return  # 1xx: the final response is still to come
        stream.response_received = True
        stream.tunnel_open = status < 300
        self._remote_transition(
            stream, Input.RECV_HEADERS_END if end_stream else Input.RECV_HEADERS
        )
        events.append(ResponseReceived(sid, status, headers, end_stream))
        if end_stream:
            events.append(StreamEnded(sid))

    # ------------------------------------------------------ control frames

    def _on_rst_stream(self, flags: int, sid: int, body: Body, events: list[Event]) -> None:
        if sid == 0 or self._is_idle(sid):
            raise ConnError(E.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        stream = self._streams.pop(sid, None)
        if stream is None:
            return
        stream.state = State.CLOSED
        self._remember_reset(sid)
        events.append(StreamReset(sid, fr.parse_u32(body), True))
        if not stream.local_initiated:
            now = self._clock()
            early = (
                not stream.response_sent or now - stream.opened_at < self.settings.early_reset_age
            )
            if early and self._early_resets.hit(now):
                raise ConnError(E.ENHANCE_YOUR_CALM, "too many streams reset right after opening")

    def _on_settings(self, flags: int, sid: int, body: Body, events: list[Event]) -> None:
        if flags & F.ACK:
            if not self._settings_unacked:
                raise ConnError(E.PROTOCOL_ERROR, "SETTINGS ACK without pending SETTINGS")
            self._settings_unacked -= 1
            return
        if self._control_rate.hit(self._clock()):
            raise ConnError(E.ENHANCE_YOUR_CALM, "too many SETTINGS and PING frames")
        for code, value in fr.parse_settings(body):
            if code == S.HEADER_TABLE_SIZE:
                self._encoder.peer_table_size_changed()
            elif code == S.ENABLE_PUSH:
                if value > 1 or (value and self.role is Role.CLIENT):
                    raise ConnError(E.PROTOCOL_ERROR, f"invalid SETTINGS_ENABLE_PUSH {value}")
            elif code == S.MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif code == S.INITIAL_WINDOW_SIZE:
                self._apply_initial_window(value)
            elif code == S.MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME_SIZE <= value <= fr.MAX_FRAME_SIZE_LIMIT:
                    raise ConnError(E.PROTOCOL_ERROR, f"invalid SETTINGS_MAX_FRAME_SIZE {value}")
                self.peer_max_frame_size = value
        self._out.append(fr.settings_ack_frame())
        events.append(
            RemoteSettingsChanged(
                self.peer_max_concurrent_streams, self.peer_initial_window, self.peer_max_frame_size
            )
        )

    def _apply_initial_window(self, value: int) -> None:
        if value > fr.MAX_WINDOW:
            raise ConnError(E.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} too large")
        delta = value - self.peer_initial_window
        self.peer_initial_window = value
        for stream in self._streams.values():
            stream.send_window += delta
            if stream.send_window > fr.MAX_WINDOW:
                raise ConnError(E.FLOW_CONTROL_ERROR, "a stream window grew past 2^31-1")

    def _on_ping(self, flags: int, sid: int, body: Body, events: list[Event]) -> None:
        if sid:
            raise ConnError(E.PROTOCOL_ERROR, "PING on a stream")
        if self._control_rate.hit(self._clock()):
            raise ConnError(E.ENHANCE_YOUR_CALM, "too many SETTINGS and PING frames")
        if flags & F.ACK:
            events.append(PingAcked(bytes(body)))
        else:
            self._out.append(fr.ping_frame(bytes(body), ack=True))

    def _on_goaway(self, flags: int, sid: int, body: Body, events: list[Event]) -> None:
        if sid:
            raise ConnError(E.PROTOCOL_ERROR, "GOAWAY on a stream")
        last, code, debug = fr.parse_goaway(body)
        self.goaway_received = True
        for stream_id in [s for s, st in self._streams.items() if st.local_initiated and s > last]:
            del self._streams[stream_id]
            events.append(StreamReset(stream_id, E.REFUSED_STREAM, True))
        fatal = code != E.NO_ERROR
        if fatal:
            self.closed = True
            self._streams.clear()
        message = debug[:256].decode("utf-8", "replace")
        events.append(ConnectionTerminated(code, last, True, fatal, message))

    def _on_window_update(self, flags: int, sid: int, body: Body, events: list[Event]) -> None:
        inc = fr.parse_u32(body) & fr.MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise ConnError(E.PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
            self._conn_send_window += inc
            if self._conn_send_window > fr.MAX_WINDOW:
                raise ConnError(E.FLOW_CONTROL_ERROR, "connection window grew past 2^31-1")
            events.append(WindowUpdated(0))
            return
        if self._is_idle(sid):
            raise ConnError(E.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        stream = self._streams.get(sid)
        if stream is None:
            return
        if inc == 0:
            raise StreamError(sid, E.PROTOCOL_ERROR, "stream WINDOW_UPDATE of 0")
        stream.send_window += inc
        if stream.send_window > fr.MAX_WINDOW:
            raise StreamError(sid, E.FLOW_CONTROL_ERROR, "stream window grew past 2^31-1")
        events.append(WindowUpdated(sid))


_Handler = Callable[[H2Receiver, int, int, Body, list[Event]], None]
_HANDLERS: dict[int, _Handler] = {
    T.DATA: H2Receiver._on_padded_data,
    T.HEADERS: H2Receiver._on_headers,
    T.CONTINUATION: H2Receiver._on_continuation,
    T.RST_STREAM: H2Receiver._on_rst_stream,
    T.SETTINGS: H2Receiver._on_settings,
    T.PING: H2Receiver._on_ping,
    T.GOAWAY: H2Receiver._on_goaway,
    T.WINDOW_UPDATE: H2Receiver._on_window_update,
}
