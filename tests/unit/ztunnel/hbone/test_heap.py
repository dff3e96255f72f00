"""The heap trimmer: one malloc_trim per burst of closed connections, after it."""

from __future__ import annotations

import asyncio

from ztunnel.hbone.heap import HeapTrimmer, malloc_trim


async def test_trims_once_after_a_burst_of_closes() -> None:
    loop = asyncio.get_running_loop()
    trimmer = HeapTrimmer(after_closes=10, delay=0.05)
    for _ in range(9):
        trimmer.connection_closed(loop)
    await asyncio.sleep(0.1)
    assert trimmer.trims == 0
    for _ in range(25):  # the 10th close arms it; the rest of the burst adds nothing
        trimmer.connection_closed(loop)
    await asyncio.sleep(0.1)
    assert trimmer.trims == (1 if malloc_trim() else 0)


async def test_disabled_and_cancelled_trimmers_do_nothing() -> None:
    loop = asyncio.get_running_loop()
    off = HeapTrimmer(after_closes=0, delay=0.0)
    for _ in range(100):
        off.connection_closed(loop)
    armed = HeapTrimmer(after_closes=1, delay=0.05)
    armed.connection_closed(loop)
    armed.cancel()
    await asyncio.sleep(0.1)
    assert off.trims == 0 and armed.trims == 0
