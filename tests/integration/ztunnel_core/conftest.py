"""A real controller (``veil controller run`` as a subprocess) for the ztunnel core tests.

The process helper is the one the ztunnel proxy tests use
(``tests/integration/ztunnel_proxy/ztunnel_mesh_harness.py``): the controller
listens on 127.0.0.1 with kernel-chosen ports, read from its startup line, and
can be stopped and started again on the same ports and state directory to
simulate an outage. Every process the fixture starts is stopped at the end,
also on failure; files live in pytest's tmp_path.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# The shared controller helper lives beside the ztunnel proxy tests
# (--import-mode=importlib keeps test directories off sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ztunnel_proxy"))

from ztunnel_mesh_harness import ControllerProcess

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "registry.yaml"

__all__ = ["ControllerProcess", "example_doc"]


def example_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    # Workload certificates live 6 s, so rotation at half-life is seen within seconds.
    ctrl = ControllerProcess(tmp_path, example_doc(), extra=("--default-ttl", "6s"))
    ctrl.start()
    try:
        yield ctrl
    finally:
        ctrl.stop()
