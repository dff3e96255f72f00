"""A node that stops reading its watch stream: coalesced, bounded, never blocking others.

The controller runs in this process (the same :class:`controller.server.Controller`
that ``veil controller run`` starts) so the test can look at the hub's per-watcher
pending maps while real gRPC clients watch over mutual TLS.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from controller.api.model import Labels, Namespace, RegistryState, Workload
from controller.config import ControllerConfig, add_run_arguments
from controller.discovery import index_state
from controller.registry import build_state
from controller.server import Controller

from .conftest import EXAMPLE, Watcher, join_with_token

WORKLOADS = 2000
CHANGES = 20


def big_state(tag: str) -> RegistryState:
    ns = Namespace("shop", Labels({"veil.io/dataplane-mode": "ambient"}))
    workloads = [
        Workload(
            f"w{i}",
            "shop",
            f"sa{i % 50}",
            f"node-{i % 2}",
            (f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",),
            # Every publish changes every workload, so each delta is large
            # (hundreds of kB) and a reader that stops fills the stream quickly.
            Labels({"app": f"app{i % 100}", "rev": tag, "pad": "p" * 50}),
        )
        for i in range(WORKLOADS)
    ]
    return build_state("cluster.local", [ns], workloads)


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[Controller]:
    registry = tmp_path / "registry.yaml"
    registry.write_text(EXAMPLE.read_text())
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(
        [
            "--registry",
            str(registry),
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            "127.0.0.1:0",
            "--join-listen",
            "127.0.0.1:0",
        ]
    )
    controller = Controller(ControllerConfig.from_args(args, {}))
    await controller.start()
    try:
        yield controller
    finally:
        await controller.stop()


async def test_slow_watcher_is_coalesced_and_does_not_block_a_fast_one(inproc: Controller) -> None:
    state_dir = inproc.config.state_dir
    join, mtls = f"127.0.0.1:{inproc.ports[1]}", f"127.0.0.1:{inproc.ports[0]}"
    fast = await Watcher.open(await join_with_token(state_dir, join, mtls, "node-a"))
    slow = await Watcher.open(await join_with_token(state_dir, join, mtls, "node-b"))
    rss = psutil.Process().memory_info
    try:
        await fast.next()
        await slow.next()  # then node-b stops reading
        inproc.registry.publish(big_state("warmup"), source="test")
        await fast.next()
        baseline = rss().rss

        worst = 0.0
        for k in range(CHANGES):
            start = time.monotonic()
            inproc.registry.publish(big_state(f"r{k}"), source="test")
            update = await fast.next(timeout=10)
            worst = max(worst, time.monotonic() - start)
            assert update.version == inproc.hub.version  # the fast node is never held back
            assert len(update.upserts) == WORKLOADS

        info = {w.node: w for w in inproc.hub.watchers()}
        # node-b's stream is full: its changes wait in one pending map, one entry per key.
        assert info["node-b"].sent_version < inproc.hub.version
        assert 0 < info["node-b"].pending <= WORKLOADS + 1
        growth = rss().rss - baseline
        assert growth < 150 * 1024 * 1024, f"controller memory grew by {growth >> 20} MiB"
        assert worst < 5.0

        # When node-b reads again it catches up with far fewer messages than changes.
        messages = 0
        while slow.version != inproc.hub.version:
            await slow.next(timeout=10)
            messages += 1
        assert messages < CHANGES
        assert slow.held == index_state(inproc.registry.current())
    finally:
        await fast.close()
        await slow.close()
