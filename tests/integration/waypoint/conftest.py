"""The waypoint's loopback tests run on uvloop, like the ztunnel's; ``env`` is
the whole loopback set-up (tests/support/waypoint_env.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
import uvloop

from tests.support.waypoint_env import Env, waypoint_env


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with waypoint_env(tmp_path) as e:
        yield e
