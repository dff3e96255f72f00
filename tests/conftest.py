"""Suite-wide test settings. Room-specific fixtures live in each tier's conftest."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

# The suite forks subprocesses (veil, veilctl, iperf3...) while gRPC channels of
# in-process controllers and clients may be busy; children always exec, so gRPC's
# fork handlers, which can abort such a child before its exec, stay off (as in the
# `veil` command itself, cli/veil.py). Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest
from hypothesis import HealthCheck, settings

from tests.support.ci import fail_netns_skip

settings.register_profile(
    "veil", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("VEIL_HYPOTHESIS_PROFILE", "veil"))


_NETNS = Path(__file__).parent / "netns"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The netns tier needs root: without it its tests skip (which fails under CI, below)."""
    if os.geteuid() == 0:
        return
    for item in items:
        if _NETNS in item.path.parents:
            item.add_marker(pytest.mark.skip(reason="netns tests need root"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI a skipped netns test, for whatever reason, is reported as a failure."""
    report = yield
    fail_netns_skip(report, item.get_closest_marker("netns") is not None)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """The same for a netns module that skips as a whole (``allow_module_level``)."""
    report = yield
    fail_netns_skip(report, _NETNS in collector.path.parents)
    return report
