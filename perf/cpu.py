"""CPU seconds spent by a set of processes, read from /proc.

Throughput and latency swing with whatever else the machine runs; the CPU time
a proxy spends per byte or per connection barely does. The mesh benchmark
therefore records, for each measurement window, the user + system seconds of
Veil's two ztunnels and of the stunnel pair, and reports CPU per GB and per
1,000 new connections as first-class figures.

A process's time includes its threads (``/proc/<pid>/stat`` fields 14 and 15
sum every thread of the thread group), and :class:`CpuMeter` follows children
(the ztunnel's workers, the ``nsenter`` wrapper's child), found again on every
read so a restarted worker is still counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

__all__ = ["CpuMeter", "CpuWindow", "process_cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system seconds of one process (all its threads); 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces and parentheses: split after
    # the last ')'. utime and stime are fields 14 and 15, so 11 and 12 after it.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass(frozen=True, slots=True)
class CpuWindow:
    """CPU seconds a group of processes spent between two reads."""

    seconds: float

    def per_gb(self, nbytes: float) -> float | None:
        return self.seconds / (nbytes / 1e9) if nbytes > 0 else None

    def per_1000(self, count: float) -> float | None:
        return self.seconds / count * 1000 if count > 0 else None


class CpuMeter:
    """Sums the CPU time of root processes and all their descendants."""

    def __init__(self, roots: Iterable[int]) -> None:
        self._roots = tuple(roots)
        self._start: dict[int, float] = {}

    def _pids(self) -> set[int]:
        pids: set[int] = set()
        for root in self._roots:
            try:
                proc = psutil.Process(root)
                pids.add(root)
                pids.update(c.pid for c in proc.children(recursive=True))
            except psutil.Error:
                continue
        return pids

    def _read(self) -> dict[int, float]:
        return {pid: process_cpu_seconds(pid) for pid in self._pids()}

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> CpuWindow:
        """CPU seconds since :meth:`start`; a process born in the window counts from 0."""
        now = self._read()
        spent = sum(max(0.0, t - self._start.get(pid, 0.0)) for pid, t in now.items())
        return CpuWindow(spent)
