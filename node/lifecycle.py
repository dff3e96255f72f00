"""Running a node process until SIGTERM or SIGINT: start, serve, drain.

The ztunnel (one process or the workers' supervisor) and the waypoint share
this shape: a signal may come while the process is still starting (then the
start is cancelled), a startup error is raised to the caller, and whatever
happened the service drains and stops before the handlers are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Protocol

__all__ = ["Service", "run_until_signalled"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...


async def run_until_signalled(
    make: Callable[[], Service], *, on_started: Callable[[], None] | None = None
) -> int:
    """Builds the service with ``make`` and runs it until a signal; returns 0.

    ``on_started`` runs once the start completed (process-wide tuning that
    must not apply to a half-started process)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        service = make()
        try:
            starting = loop.create_task(service.start())
            stopping = loop.create_task(stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # raises a startup error
                if on_started is not None:
                    on_started()
                await stopping
            else:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                stopping.cancel()
        finally:
            await service.shutdown()
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    return 0
