"""A stateless HPACK encoder: header blocks that never touch the dynamic table.

HBONE header lists are tiny (``:method``, ``:authority``, ``forwarded``; or
``:status``) and their values change with every stream (the client's port is
in ``forwarded``). Indexing them would only churn both dynamic tables, and the
general-purpose encoder's table search and Huffman coding cost more than the
rest of opening a stream. So every field is either a full match in the static
table (one byte), or a literal *without indexing*, with the name from the
static table when it is there, and the value as plain octets (RFC 7541
sections 6.1 and 6.2.2). Any HPACK decoder reads these blocks.

Because nothing is ever inserted, the encoder has no state to keep in step
with the peer's decoder, except one rule: the first block, and the first block
after the peer changed SETTINGS_HEADER_TABLE_SIZE, start with a dynamic table
size update to 0 (section 6.3), saying this encoder uses no table at all.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.table import HeaderTable

__all__ = ["HeaderEncoder", "encode_integer"]

_STATIC: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
_FULL: dict[tuple[str, str], int] = {}
_NAMES: dict[str, int] = {}
for _i, (_n, _v) in enumerate(_STATIC, start=1):
    _FULL.setdefault((_n.decode(), _v.decode()), _i)
    _NAMES.setdefault(_n.decode(), _i)
del _i, _n, _v

_TABLE_SIZE_ZERO = b"\x20"  # 001xxxxx: dynamic table size update, size 0


def encode_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 section 5.1: ``value`` with an N-bit prefix, ``flags`` in the high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(raw: bytes) -> bytes:
    return encode_integer(len(raw), 7, 0x00) + raw  # H bit clear: plain octets


def _field(name: str, value: str) -> bytes:
    index = _FULL.get((name, value))
    if index is not None:
        return encode_integer(index, 7, 0x80)  # indexed header field
    name_index = _NAMES.get(name)
    if name_index is not None:
        head = encode_integer(name_index, 4, 0x00)  # literal, no indexing, indexed name
    else:
        head = b"\x00" + _string(name.encode())  # literal, no indexing, new name
    return head + _string(value.encode())


class HeaderEncoder:
    """Encodes header lists into HPACK blocks without a dynamic table."""

    __slots__ = ("_announce",)

    def __init__(self) -> None:
        self._announce = True  # the next block starts with a table size update

    def peer_table_size_changed(self) -> None:
        """The peer sent SETTINGS_HEADER_TABLE_SIZE: restate that we use no table."""
        self._announce = True

    def encode(self, headers: Iterable[tuple[str, str]]) -> bytes:
        parts = [_field(name, value) for name, value in headers]
        if self._announce:
            self._announce = False
            parts.insert(0, _TABLE_SIZE_ZERO)
        return b"".join(parts)
