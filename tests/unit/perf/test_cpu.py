"""CPU accounting for the benchmarks reads real /proc figures."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from perf.cpu import CpuMeter, CpuWindow, process_cpu_seconds


def test_a_busy_child_is_counted_and_a_gone_process_reads_zero() -> None:
    busy = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])",
        ]
    )
    try:
        meter = CpuMeter([parent.pid])
        meter.start()
        deadline = time.monotonic() + 20
        while parent.poll() is None and time.monotonic() < deadline:
            window = meter.stop()
            if window.seconds >= 0.25:
                break
            time.sleep(0.05)
        assert window.seconds >= 0.25, window
    finally:
        parent.kill()
        parent.wait(10)
    assert process_cpu_seconds(parent.pid) == 0.0
    assert process_cpu_seconds(os.getpid()) > 0.0


def test_window_ratios() -> None:
    assert CpuWindow(2.0).per_gb(4e9) == 0.5
    assert CpuWindow(3.0).per_1000(1500) == 2.0
    assert CpuWindow(1.0).per_gb(0) is None
