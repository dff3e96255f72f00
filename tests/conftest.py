"""Suite-wide test settings. Room-specific fixtures live in each tier's conftest."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "veil", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("VEIL_HYPOTHESIS_PROFILE", "veil"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The netns tier needs root; in CI a skip there is a failure, so fail loudly instead."""
    if os.geteuid() == 0:
        return
    for item in items:
        if "tests/netns" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason="netns tests need root"))
