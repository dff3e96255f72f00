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


def test_a_free_pooled_buffer_is_reused_before_allocating() -> None:
    buf = ReadBuffer(64, slots=2)
    kept = buf.view()[:1]  # the first buffer stays held
    second = buf.view()
    second_obj = id(second.obj)
    del second
    assert buf.pooled == 2
    again = buf.view()
    assert id(again.obj) == second_obj  # no third allocation
    assert again.obj is not kept.obj
    assert buf.pooled == 2


def test_pool_stays_bounded_while_every_buffer_is_held() -> None:
    buf = ReadBuffer(64, slots=3)
    held = [buf.view()[:1] for _ in range(10)]
    assert buf.pooled == 3
    assert len({id(v.obj) for v in held}) == 10  # never one handed out twice while held
    held.clear()
    assert buf.pooled == 3


def test_a_pooled_buffer_keeps_its_size() -> None:
    buf = ReadBuffer(64)
    for _ in range(5):
        view = buf.view()
        assert len(view) == 64
        del view
