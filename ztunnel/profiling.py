"""An opt-in CPU profile of the ztunnel's event loop, for performance work.

With ``VEIL_ZTUNNEL_PROFILE=PATH`` set, :func:`loop_profiler` profiles the
thread running the event loop with :mod:`cProfile`, timed by that thread's CPU
clock (not the wall clock: on a loaded machine a wall-clock profile charges a
function for the time the process waited for a core). The statistics go to
``PATH.<pid>`` when the ztunnel exits, and on SIGUSR2, which also starts a
fresh profile, so one run can be cut into phases (``PATH.<pid>.<n>``).
Read them with ``python -m pstats``. Unset, nothing is installed and nothing
is paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import logging
import os
import signal
import time
from collections.abc import Iterator

__all__ = ["PROFILE_ENV", "loop_profiler"]

PROFILE_ENV = "VEIL_ZTUNNEL_PROFILE"

log = logging.getLogger("veil.ztunnel")


class _LoopProfiler:
    def __init__(self, path: str) -> None:
        self.path = f"{path}.{os.getpid()}"
        self.cuts = 0
        self.profile = self._new()

    @staticmethod
    def _new() -> cProfile.Profile:
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        return profile

    def cut(self) -> None:
        """Writes the profile so far to the next phase file and starts afresh."""
        self.profile.disable()
        self.cuts += 1
        self._write(f"{self.path}.{self.cuts}")
        self.profile = self._new()

    def finish(self) -> None:
        self.profile.disable()
        self._write(self.path)

    def _write(self, path: str) -> None:
        try:
            self.profile.dump_stats(path)
        except OSError as e:
            log.warning("could not write the CPU profile to %s: %s", path, e)
        else:
            log.info("CPU profile written to %s", path)


@contextlib.contextmanager
def loop_profiler(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Profiles the calling thread while the block runs, if the variable asks for it."""
    path = os.environ.get(PROFILE_ENV, "")
    if not path:
        yield
        return
    profiler = _LoopProfiler(path)
    loop.add_signal_handler(signal.SIGUSR2, profiler.cut)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)
        profiler.finish()
