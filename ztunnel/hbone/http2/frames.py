"""HTTP/2 wire constants and frame encoders (RFC 9113, section 4 and 6).

Pure functions that build frames as ``bytes``, and the constants both halves
use; splitting bytes into frames is :mod:`ztunnel.hbone.http2.decoder`.
Every frame starts with the same 9-byte header: 24-bit length, 8-bit type,
8-bit flags, 1 reserved bit and a 31-bit stream identifier.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_WINDOW",
    "FLAG_ACK",
    "FLAG_END_HEADERS",
    "FLAG_END_STREAM",
    "FLAG_PADDED",
    "FLAG_PRIORITY",
    "FRAME_HEADER",
    "MAX_FRAME_SIZE_LIMIT",
    "MAX_WINDOW",
    "PREFACE",
    "ErrorCode",
    "Flag",
    "FrameType",
    "SettingCode",
    "data_header",
    "goaway_frame",
    "headers_frames",
    "pack_header",
    "parse_goaway",
    "parse_settings",
    "parse_u32",
    "ping_frame",
    "rst_stream_frame",
    "settings_ack_frame",
    "settings_frame",
    "unpack_header",
    "window_update_frame",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME_SIZE = 16_384
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1

# length (16 high bits + 8 low bits), type, flags, stream id
_HEADER = struct.Struct(">HBBBL")
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")


class FrameType(enum.IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag(enum.IntFlag):
    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


# The same bits as plain ints, for the per-frame path: IntFlag arithmetic builds
# an enum member on every ``&``, which showed up in profiles.
FLAG_END_STREAM = int(Flag.END_STREAM)
FLAG_ACK = int(Flag.ACK)
FLAG_END_HEADERS = int(Flag.END_HEADERS)
FLAG_PADDED = int(Flag.PADDED)
FLAG_PRIORITY = int(Flag.PRIORITY)


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class SettingCode(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


def pack_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, ftype, flags, stream_id & MAX_WINDOW)


def unpack_header(
    buf: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[int, int, int, int]:
    """``(length, type, flags, stream_id)``; the reserved bit is ignored as RFC 9113 asks."""
    hi, lo, ftype, flags, sid = _HEADER.unpack_from(buf, offset)
    return (hi << 8) | lo, ftype, flags, sid & MAX_WINDOW


def data_header(length: int, stream_id: int, end_stream: bool) -> bytes:
    # Plain ints (DATA is type 0, END_STREAM bit 1): enum members cost a lookup
    # each on the per-frame path.
    return _HEADER.pack(length >> 8, length & 0xFF, 0, 1 if end_stream else 0, stream_id)


def settings_frame(settings: Iterable[tuple[int, int]]) -> bytes:
    body = b"".join(_SETTING.pack(code, value) for code, value in settings)
    return pack_header(len(body), FrameType.SETTINGS, 0, 0) + body


def settings_ack_frame() -> bytes:
    return pack_header(0, FrameType.SETTINGS, Flag.ACK, 0)


def ping_frame(opaque: bytes, ack: bool = False) -> bytes:
    if len(opaque) != 8:
        raise ValueError("PING payload must be exactly 8 bytes")
    return pack_header(8, FrameType.PING, Flag.ACK if ack else 0, 0) + opaque


def goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    body = _GOAWAY.pack(last_stream_id & MAX_WINDOW, code) + debug
    return pack_header(len(body), FrameType.GOAWAY, 0, 0) + body


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return pack_header(4, FrameType.WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment & MAX_WINDOW)


def rst_stream_frame(stream_id: int, code: int) -> bytes:
    return pack_header(4, FrameType.RST_STREAM, 0, stream_id) + _U32.pack(code)


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame_size: int) -> bytes:
    """A HEADERS frame, followed by CONTINUATION frames when the block is larger
    than the peer's maximum frame size."""
    first = block[:max_frame_size]
    rest = block[max_frame_size:]
    flags = Flag.END_STREAM if end_stream else 0
    if not rest:
        flags |= Flag.END_HEADERS
    out = [pack_header(len(first), FrameType.HEADERS, flags, stream_id), first]
    while rest:
        chunk, rest = rest[:max_frame_size], rest[max_frame_size:]
        cflags = 0 if rest else Flag.END_HEADERS
        out += [pack_header(len(chunk), FrameType.CONTINUATION, cflags, stream_id), chunk]
    return b"".join(out)


def parse_settings(body: bytes | memoryview) -> list[tuple[int, int]]:
    """Setting pairs of a SETTINGS body whose length is a multiple of 6."""
    return [_SETTING.unpack_from(body, off) for off in range(0, len(body), 6)]


def parse_u32(body: bytes | memoryview) -> int:
    value: int = _U32.unpack_from(body, 0)[0]
    return value


def parse_goaway(body: bytes | memoryview) -> tuple[int, int, bytes]:
    last, code = _GOAWAY.unpack_from(body, 0)
    return last & MAX_WINDOW, code, bytes(body[8:])
