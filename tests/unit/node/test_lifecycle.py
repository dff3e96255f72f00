"""node.lifecycle: start, serve until a signal, drain; the three ways it ends."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from node.lifecycle import run_until_signalled


class Svc:
    def __init__(self, start_delay: float = 0.0, fail: bool = False) -> None:
        self.events: list[str] = []
        self.start_delay = start_delay
        self.fail = fail

    async def start(self) -> None:
        self.events.append("start")
        await asyncio.sleep(self.start_delay)
        if self.fail:
            raise RuntimeError("cannot bind")
        self.events.append("started")

    async def shutdown(self) -> None:
        self.events.append("shutdown")


def _term_soon(delay: float) -> None:
    asyncio.get_running_loop().call_later(delay, os.kill, os.getpid(), signal.SIGTERM)


async def test_serves_until_sigterm_then_drains() -> None:
    svc = Svc()
    tuned: list[bool] = []
    _term_soon(0.05)
    assert await run_until_signalled(lambda: svc, on_started=lambda: tuned.append(True)) == 0
    assert svc.events == ["start", "started", "shutdown"] and tuned == [True]


async def test_a_signal_during_start_cancels_it_and_still_drains() -> None:
    svc = Svc(start_delay=10.0)
    _term_soon(0.05)
    async with asyncio.timeout(5):
        assert await run_until_signalled(lambda: svc) == 0
    assert svc.events == ["start", "shutdown"]


async def test_a_startup_error_is_raised_after_the_drain() -> None:
    svc = Svc(fail=True)
    with pytest.raises(RuntimeError, match="cannot bind"):
        await run_until_signalled(lambda: svc)
    assert svc.events == ["start", "shutdown"]
