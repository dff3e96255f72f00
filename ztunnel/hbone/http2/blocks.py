"""Header blocks: HEADERS plus CONTINUATION frames in, decoded header fields out.

:class:`HeaderBlocks` strips padding and the (ignored) priority fields,
collects CONTINUATION frames under the size and count limits, and decodes the
finished block with HPACK (RFC 9113 sections 4.3, 6.2 and 6.10). Every block
is decoded, even one the connection goes on to refuse, because the HPACK
dynamic table must stay in step with the peer's encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import hpack

from .frames import (
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FLAG_PRIORITY,
    MAX_WINDOW,
    ErrorCode,
    FrameType,
    parse_u32,
)
from .settings import H2Settings
from .violations import ConnError

__all__ = ["HeaderBlock", "HeaderBlocks"]

Body = bytes | memoryview
# Room for a HEADERS frame's pad length, priority fields and padding.
_HEADERS_OVERHEAD = 6 + 256


@dataclass(frozen=True, slots=True)
class HeaderBlock:
    """One complete, decoded header block."""

    stream_id: int
    fields: list[tuple[bytes, bytes]]
    end_stream: bool
    self_dependent: bool  # its priority names its own stream (RFC 9113 section 5.3.1)


class HeaderBlocks:
    """Assembles and decodes the header blocks of one connection."""

    __slots__ = (
        "_block",
        "_decoder",
        "_end_stream",
        "_frames",
        "_self_dependent",
        "_settings",
        "stream_id",
    )

    def __init__(self, settings: H2Settings) -> None:
        self._settings = settings
        self._decoder = hpack.Decoder(max_header_list_size=settings.max_header_list_size)
        self._decoder.max_allowed_table_size = settings.header_table_size
        self._block: bytearray | None = None  # waiting for CONTINUATION
        self._end_stream = False
        self._self_dependent = False
        self._frames = 0
        self.stream_id = 0

    @property
    def pending(self) -> bool:
        """A block is open: the next frame must be its CONTINUATION."""
        return self._block is not None

    def drop(self) -> None:
        self._block = None

    def check_next(self, length: int, ftype: int, stream_id: int) -> None:
        """Header-only checks of the frame after an unfinished block."""
        cfg = self._settings
        assert self._block is not None
        if ftype != FrameType.CONTINUATION or stream_id != self.stream_id:
            raise ConnError(
                ErrorCode.PROTOCOL_ERROR, f"expected CONTINUATION on stream {stream_id}"
            )
        self._frames += 1
        if self._frames > cfg.max_continuations:
            raise ConnError(ErrorCode.ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if len(self._block) + length > cfg.max_header_block:
            raise ConnError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")

    def check_headers_length(self, length: int) -> None:
        if length > self._settings.max_header_block + _HEADERS_OVERHEAD:
            raise ConnError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")

    def headers(self, flags: int, stream_id: int, body: Body) -> HeaderBlock | None:
        """A HEADERS frame; the block, or None while CONTINUATION frames are due."""
        if stream_id == 0:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(body)
        if flags & FLAG_PADDED:
            if not body:
                raise ConnError(ErrorCode.FRAME_SIZE_ERROR, "padded HEADERS without a pad length")
            start, end = 1, end - body[0]
        self_dependent = False
        if flags & FLAG_PRIORITY:
            if start + 5 > end:
                raise ConnError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            self_dependent = parse_u32(body[start : start + 4]) & MAX_WINDOW == stream_id
            start += 5
        if start > end:
            raise ConnError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding exceeds the frame")
        fragment = bytes(body[start:end])
        if len(fragment) > self._settings.max_header_block:
            raise ConnError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        end_stream = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            return self._decode(stream_id, fragment, end_stream, self_dependent)
        self._block = bytearray(fragment)
        self.stream_id = stream_id
        self._end_stream = end_stream
        self._self_dependent = self_dependent
        self._frames = 0
        return None

    def continuation(self, flags: int, body: Body) -> HeaderBlock | None:
        """A CONTINUATION frame (already admitted by :meth:`check_next`)."""
        assert self._block is not None
        self._block += body
        if not flags & FLAG_END_HEADERS:
            return None
        block = bytes(self._block)
        self._block = None
        return self._decode(self.stream_id, block, self._end_stream, self._self_dependent)

    def _decode(
        self, stream_id: int, block: bytes, end_stream: bool, self_dependent: bool
    ) -> HeaderBlock:
        try:
            fields = [(bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True)]
        except hpack.OversizedHeaderListError:
            raise ConnError(ErrorCode.ENHANCE_YOUR_CALM, "header list too large") from None
        except (hpack.HPACKError, ValueError, IndexError, TypeError) as exc:
            raise ConnError(ErrorCode.COMPRESSION_ERROR, f"HPACK decoding failed: {exc}") from None
        return HeaderBlock(stream_id, fields, end_stream, self_dependent)
