"""Splitting the peer's bytes into HTTP/2 frames (RFC 9113 sections 3.4 and 4.1).

:class:`FrameDecoder` owns the framing state only: the client preface, frame
headers, frame bodies split across reads, bodies to skip, and DATA payloads
streamed out as they arrive. What a frame *means* is the sink's business
(:class:`~ztunnel.hbone.http2.receive.FrameReceiver`): for every frame header
the sink answers whether to buffer the body, skip it, or stream it as DATA.

It works on the caller's buffer: complete frames are handed over as slices of
it, only a frame split across two reads is copied. ``max_frames`` lets the IO
driver stop at a frame boundary and hand the rest to a later event-loop turn.
"""

from __future__ import annotations

from typing import Protocol

from . import frames as fr
from .violations import ConnError

__all__ = ["BUFFER", "SKIP", "STREAM", "FrameDecoder", "FrameSink"]

BUFFER = 0  # collect the whole body, then on_frame()
SKIP = 1  # discard the body
STREAM = 2  # hand the body out in pieces through on_data_chunk()

Body = bytes | memoryview


class FrameSink(Protocol):
    """What the decoder reports to; ``closed`` stops decoding at once."""

    @property
    def closed(self) -> bool: ...

    def on_frame_header(self, length: int, ftype: int, flags: int, stream_id: int) -> int:
        """Checks that need only the header; returns BUFFER, SKIP or STREAM."""
        ...

    def on_frame(self, ftype: int, flags: int, stream_id: int, body: Body) -> None: ...

    def on_data_chunk(self, chunk: memoryview, last: bool) -> None: ...


class FrameDecoder:
    """Incremental frame splitter feeding one :class:`FrameSink`."""

    __slots__ = (
        "_body",
        "_body_len",
        "_data_left",
        "_frame",
        "_header",
        "_preface_left",
        "_sink",
        "_skip",
    )

    def __init__(self, sink: FrameSink, expect_preface: bool) -> None:
        self._sink = sink
        self._preface_left = fr.PREFACE if expect_preface else b""
        self._header = bytearray()
        self._frame: tuple[int, int, int] | None = None  # (type, flags, stream) of _body
        self._body_len = 0
        self._body = bytearray()
        self._skip = 0  # body bytes to discard
        self._data_left = 0  # streamed DATA payload bytes still to come

    @property
    def preface_done(self) -> bool:
        """The client preface (server side only) has arrived in full."""
        return not self._preface_left

    @property
    def at_boundary(self) -> bool:
        """No frame is half-read."""
        return not (self._header or self._frame or self._skip or self._data_left)

    def feed(self, view: memoryview, max_frames: int = 0) -> int:
        """Decode ``view``; returns how many bytes were used.

        Stops early only to honour ``max_frames`` (new frame headers read in this
        call; 0 means no limit) or once the sink is closed. Raises
        :class:`ConnError` for a bad preface; the sink raises for everything else.
        """
        pos, n = 0, len(view)
        if self._preface_left:
            take = min(len(self._preface_left), n)
            if view[:take] != self._preface_left[:take]:
                raise ConnError(fr.ErrorCode.PROTOCOL_ERROR, "invalid HTTP/2 connection preface")
            self._preface_left = self._preface_left[take:]
            pos = take
        sink = self._sink
        frames = 0
        while pos < n and not sink.closed:
            if self._data_left:
                take = min(self._data_left, n - pos)
                self._data_left -= take
                sink.on_data_chunk(view[pos : pos + take], not self._data_left)
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
                    sink.on_frame(ftype, flags, sid, body)
            else:
                if max_frames and frames >= max_frames and not self._header:
                    return pos
                if self._header or n - pos < fr.FRAME_HEADER:
                    take = min(fr.FRAME_HEADER - len(self._header), n - pos)
                    self._header += view[pos : pos + take]
                    pos += take
                    if len(self._header) < fr.FRAME_HEADER:
                        return pos
                    length, ftype, flags, sid = fr.unpack_header(self._header)
                    self._header.clear()
                else:
                    length, ftype, flags, sid = fr.unpack_header(view, pos)
                    pos += fr.FRAME_HEADER
                frames += 1
                action = sink.on_frame_header(length, ftype, flags, sid)
                if action == STREAM:
                    self._data_left = length
                elif action == SKIP:
                    self._skip = length
                elif n - pos >= length:
                    sink.on_frame(ftype, flags, sid, view[pos : pos + length])
                    pos += length
                else:
                    self._frame = (ftype, flags, sid)
                    self._body_len = length
                    self._body += view[pos:]
                    pos = n
        return pos
