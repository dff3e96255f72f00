"""Fixtures for the netns tier: every topology a test builds is torn down, even on failure.

At session start, labs left by crashed runs (owner process gone) are removed;
labs of other live sessions on the same machine are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import DEFAULT_CONTROLLER_IP, LabError, Topology, cleanup_stale

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.netns)


_PIN_ROOT = Path("/sys/fs/bpf/veil")


@pytest.fixture(scope="session", autouse=True)
def _pin_root_left_as_found() -> Iterator[None]:
    """Tests pin under per-test directories below /sys/fs/bpf/veil (the production
    default); remove that parent at the end if this session created it."""
    existed = _PIN_ROOT.exists()
    yield
    if not existed:
        with contextlib.suppress(OSError):  # not empty: a test leaked pins; keep the evidence
            _PIN_ROOT.rmdir()


@pytest.fixture(scope="session", autouse=True)
def _remove_stale_labs() -> None:
    cleanup_stale()


@pytest.fixture
def topology() -> Iterator[Callable[..., Topology]]:
    """A factory: ``topo = topology()`` gives an unbuilt Topology closed after the test."""
    made: list[Topology] = []

    def factory(
        prefix: str | None = None, *, controller_ip: str = DEFAULT_CONTROLLER_IP
    ) -> Topology:
        topo = Topology(prefix, controller_ip=controller_ip)
        made.append(topo)
        return topo

    yield factory
    errors: list[LabError] = []
    for topo in reversed(made):
        try:
            topo.close()
        except LabError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def lab() -> Iterator[Topology]:
    """A built two-node lab: node-a and node-b, each with pod-0, pod-1 and pod-2."""
    topo = Topology.standard(nodes=2, pods_per_node=3)
    try:
        yield topo
    finally:
        topo.close()
