"""The shared read buffer is reused until a transport keeps a piece of it."""

from __future__ import annotations

from ztunnel.hbone.buffers import ReadBuffer, shared_buffer


def test_buffer_is_reused_when_nothing_holds_it() -> None:
    buf = ReadBuffer(64)
    first = buf.view()
    obj = first.obj
    del first
    assert buf.view().obj is obj


def test_buffer_is_replaced_while_a_slice_is_alive() -> None:
    buf = ReadBuffer(64)
    view = buf.view()
    view[:5] = b"hello"
    kept = view[:5]  # what a transport with a backlog would keep
    del view
    fresh = buf.view()
    fresh[:5] = b"XXXXX"
    assert bytes(kept) == b"hello"
    assert fresh.obj is not kept.obj


def test_shared_buffer_is_per_size() -> None:
    assert shared_buffer(1024) is shared_buffer(1024)
    assert shared_buffer(1024) is not shared_buffer(2048)
    assert shared_buffer(1024).size == 1024
