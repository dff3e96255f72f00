"""Event loops for the proxy's loopback tests.

The ztunnel runs on uvloop, so every test here does too; modules that set
``BOTH_LOOPS = True`` also run on the standard asyncio loop, because the
relay's correctness must not depend on which transport implementation is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if getattr(module, "BOTH_LOOPS", False):
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}
