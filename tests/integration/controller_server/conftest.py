"""A real controller for the server tests: ``veil controller run`` as a subprocess.

The controller listens on 127.0.0.1 with ports chosen by the kernel (``:0``);
the fixture reads the bound ports from the startup line. Nodes join with real
single-use tokens (written to the controller's token file, exactly as
``veil controller token create`` does) and watch over mutual TLS with
:class:`controller.api.client.ControllerClient`. Every process and file the
fixture creates is removed at the end, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.api.client import ControllerClient
from controller.api.model import Resource, ResourceType, WatchUpdate, resource_key
from node import NodeCredentials
from tests.support.controller import (
    EXAMPLE,
    REPO,
    ControllerProcess,
    example_doc,
    join_with_token,
    stop_process,
    veil_argv,
)

__all__ = [
    "EXAMPLE",
    "REPO",
    "RunningController",
    "Watcher",
    "example_doc",
    "join_with_token",
    "stop_process",
    "veil_argv",
]

# The tests here name the process helper by what it is to them: a running controller.
RunningController = ControllerProcess


def start_controller(work: Path, *extra: str) -> RunningController:
    """``veil controller run`` on kernel-chosen loopback ports, serving the example registry."""
    return ControllerProcess(
        work,
        EXAMPLE.read_text(),
        extra=extra,
        registry_poll=0.2,
        state_path=work / "state",
    ).start()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[RunningController]:
    ctrl = start_controller(tmp_path)
    try:
        yield ctrl
    finally:
        ctrl.stop()


class Watcher:
    """One node's watch stream, with the state it holds after applying updates."""

    def __init__(self, client: ControllerClient, stream: AsyncIterator[WatchUpdate]) -> None:
        self.client = client
        self._stream = stream
        self.held: dict[tuple[ResourceType, str], Resource] = {}
        self.epoch = ""
        self.version = 0
        self.bundle: tuple[bytes, ...] = ()
        self._next: asyncio.Task[WatchUpdate] | None = None

    @classmethod
    async def open(
        cls,
        creds: NodeCredentials,
        epoch: str = "",
        version: int = 0,
        types: tuple[ResourceType, ...] = (),
    ) -> Watcher:
        client = creds.client()
        return cls(client, client.watch(creds.node, types, epoch, version))

    async def next(self, timeout: float = 10.0) -> WatchUpdate:
        """The next update. On timeout the read stays pending (the stream is not
        cancelled), so a later call still gets that update."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._stream))
        done, _ = await asyncio.wait({self._next}, timeout=timeout)
        if not done:
            raise TimeoutError(f"no watch update within {timeout} s")
        task, self._next = self._next, None
        update = task.result()
        if update.snapshot:
            self.held.clear()
        for r in update.upserts:
            self.held[resource_key(r)] = r
        for k in update.removals:
            self.held.pop(k, None)
        self.epoch, self.version = update.epoch, update.version
        if update.trust_bundle is not None:
            self.bundle = update.trust_bundle.roots
        return update

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(BaseException):
                await self._next
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()
        await self.client.close()
