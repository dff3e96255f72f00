"""The stateless HPACK encoder: any decoder reads its blocks, no table is used."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.hbone.http2.hpack_encoder import HeaderEncoder, encode_integer

_NAME = st.from_regex(r"\A:?[a-z0-9-]{1,40}\Z")
_VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=300
)


@given(st.lists(st.tuples(_NAME, _VALUE), max_size=12))
def test_any_decoder_reads_the_blocks(headers: list[tuple[str, str]]) -> None:
    enc = HeaderEncoder()
    dec = hpack.Decoder()
    for _ in range(3):  # the decoder's table must stay empty: nothing is indexed
        decoded = [(str(n), str(v)) for n, v in dec.decode(enc.encode(headers))]
        assert decoded == headers
        assert len(dec.header_table.dynamic_entries) == 0


@pytest.mark.parametrize(
    ("headers", "block"),
    [
        ([(":status", "200")], b"\x88"),  # a full static-table match is one byte
        ([(":method", "CONNECT")], b"\x02\x07CONNECT"),  # static name, literal value
        ([("x", "y")], b"\x00\x01x\x01y"),  # new name, literal value
    ],
)
def test_representations(headers: list[tuple[str, str]], block: bytes) -> None:
    enc = HeaderEncoder()
    assert enc.encode(headers) == b"\x20" + block  # first block: table size 0
    assert enc.encode(headers) == block


def test_table_size_update_after_the_peer_changes_its_setting() -> None:
    enc = HeaderEncoder()
    enc.encode([(":status", "200")])
    enc.peer_table_size_changed()
    assert enc.encode([(":status", "200")]) == b"\x20\x88"
    assert enc.encode([(":status", "200")]) == b"\x88"


@pytest.mark.parametrize(
    ("value", "bits", "encoded"),
    [
        (10, 5, b"\x0a"),  # RFC 7541 C.1.1
        (1337, 5, b"\x1f\x9a\x0a"),  # RFC 7541 C.1.2
        (42, 8, b"\x2a"),  # RFC 7541 C.1.3
        (15, 4, b"\x0f\x00"),
    ],
)
def test_integers_match_rfc_examples(value: int, bits: int, encoded: bytes) -> None:
    assert encode_integer(value, bits, 0) == encoded
