"""Polling a condition the kernel or another process makes true, within a bound.

Netns tests watch counters a BPF program bumps or state a process writes; the
change lands a little after the packet or the call that causes it, so the test
polls for it instead of sleeping a guessed time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_for"]


def wait_for(predicate: Callable[[], object], timeout: float = 2.0, interval: float = 0.05) -> bool:
    """Polls ``predicate`` until it is true or ``timeout`` seconds passed.

    Returns its last answer as a bool, so ``assert wait_for(...)`` reads as the
    condition itself; it is checked once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
