"""A real controller (``veil controller run`` as a subprocess) for the ztunnel core tests.

The process helper is :class:`tests.support.controller.ControllerProcess`: the
controller listens on 127.0.0.1 with kernel-chosen ports, read from its
startup line, and can be stopped and started again on the same ports and state
directory to simulate an outage. Every process the fixture starts is stopped
at the end, also on failure; files live in pytest's tmp_path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.controller import ControllerProcess, example_doc

__all__ = ["ControllerProcess", "example_doc"]


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    # Workload certificates live 6 s, so rotation at half-life is seen within seconds.
    ctrl = ControllerProcess(tmp_path, example_doc(), extra=("--default-ttl", "6s"))
    ctrl.start()
    try:
        yield ctrl
    finally:
        ctrl.stop()
