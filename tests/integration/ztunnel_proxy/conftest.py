"""Fixtures for the proxy's loopback tests: event loops, a real controller, ztunnels.

The ztunnel runs on uvloop, so every test here does too; modules that set
``BOTH_LOOPS = True`` also run on the standard asyncio loop, because the
relay's correctness must not depend on which transport implementation is used.
Every process, task and socket a fixture creates is closed at the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import pytest
import uvloop

from tests.support.controller import ControllerProcess
from tests.support.loopback_mesh import AccessLog, App, Mesh, default_doc, start_app


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if getattr(module, "BOTH_LOOPS", False):
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


def _controller(tmp_path: Path, ttl: str) -> Iterator[ControllerProcess]:
    ctrl = ControllerProcess(tmp_path, default_doc(), extra=("--default-ttl", ttl))
    ctrl.start()
    try:
        yield ctrl
    finally:
        ctrl.stop()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    yield from _controller(tmp_path, "1h")


@pytest.fixture
def short_ttl_controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    """Workload certificates live 10 s: rotation at half-life within the test."""
    yield from _controller(tmp_path, "10s")


@pytest.fixture
async def mesh(controller: ControllerProcess, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(controller, tmp_path)
    try:
        yield m
    finally:
        await m.close()


@pytest.fixture
async def short_ttl_mesh(
    short_ttl_controller: ControllerProcess, tmp_path: Path
) -> AsyncIterator[Mesh]:
    m = Mesh(short_ttl_controller, tmp_path)
    try:
        yield m
    finally:
        await m.close()


@pytest.fixture
async def app() -> AsyncIterator[App]:
    a = await start_app()
    try:
        yield a
    finally:
        a.server.close()


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    handler = AccessLog()
    logger = logging.getLogger("veil.access")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
