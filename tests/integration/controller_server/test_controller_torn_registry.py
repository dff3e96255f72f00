"""A torn registry write never reaches a node's Discovery watch (issue 9, section 1).

A real ``veil controller run`` serves the example registry on loopback; a node
joins and watches over mutual TLS. The registry file is then rewritten the way
a shell redirection or a slow tool does (truncated, then written in chunks with
pauses, one open file), and cut just before ``authorizationPolicies:``. The
node may only ever see the completed versions.
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.api.model import ResourceType
from tests.support.controller import ControllerProcess

from .conftest import EXAMPLE, RunningController, Watcher, example_doc

WL = ResourceType.WORKLOAD
HOLD = 1.5


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[RunningController]:
    ctrl = ControllerProcess(
        tmp_path,
        EXAMPLE.read_text(),
        extra=("--registry-hold", str(HOLD)),
        registry_poll=0.05,  # poll often: the poll must not catch a half-written file either
        state_path=tmp_path / "state",
    ).start()
    try:
        yield ctrl
    finally:
        ctrl.stop()


def with_workload(doc: dict[str, Any], name: str, ip: str) -> dict[str, Any]:
    new = copy.deepcopy(doc)
    new["workloads"].append(
        {"name": name, "namespace": "shop", "serviceAccount": name, "node": "node-a", "ips": [ip]}
    )
    return new


async def write_in_chunks(path: Path, text: str, chunk: int, pause: float) -> None:
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        for start in range(0, len(data), chunk):
            await asyncio.sleep(pause)
            os.write(fd, data[start : start + chunk])
    finally:
        os.close(fd)


async def expect_quiet(watch: Watcher, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        update = await watch.next(timeout=seconds)
        pytest.fail(f"unexpected watch update: {update}")


async def test_chunked_rewrite_reaches_the_watch_only_when_complete(
    controller: RunningController,
) -> None:
    watch = await Watcher.open(await controller.join("node-a"))
    try:
        await watch.next()  # the snapshot
        text = yaml.safe_dump(with_workload(example_doc(), "cart", "10.244.1.20"), sort_keys=False)
        # Pauses longer than the settle window and the poll interval: only the
        # close-write tracking keeps the half-written file away from the parser.
        await write_in_chunks(controller.registry, text, 256, 0.3)
        delta = await watch.next()
        assert not delta.snapshot
        assert [r.key for r in delta.upserts] == ["shop/cart"] and delta.removals == ()
        await expect_quiet(watch, 1.0)
        assert "registry update rejected" not in controller.stderr()
        assert "registry reloaded" in controller.stderr()
        assert "workloads +1 (shop/cart)" in controller.stderr()
    finally:
        await watch.close()


async def test_cut_before_policies_is_held_and_never_applied_once_completed(
    controller: RunningController,
) -> None:
    watch = await Watcher.open(await controller.join("node-a"))
    try:
        await watch.next()
        policies = {k for k in watch.held if k[0] is ResourceType.AUTHORIZATION_POLICY}
        assert policies
        full = EXAMPLE.read_text()
        cut = full[: full.index("\nauthorizationPolicies:") + 1]
        controller.write_registry(cut)  # a completed write of a valid, cut document
        await expect_quiet(watch, HOLD * 0.6)
        assert "holding it back" in controller.stderr()

        completed = yaml.safe_dump(
            with_workload(example_doc(), "cart", "10.244.1.20"), sort_keys=False
        )
        controller.write_registry(completed)
        delta = await watch.next()
        assert [r.key for r in delta.upserts] == ["shop/cart"] and delta.removals == ()
        await expect_quiet(watch, HOLD + 1.0)  # past the hold: the cut never comes back
        assert policies <= set(watch.held)
    finally:
        await watch.close()


async def test_truncated_file_keeps_serving_and_reports_the_error(
    controller: RunningController,
) -> None:
    watch = await Watcher.open(await controller.join("node-a"))
    try:
        await watch.next()
        held = dict(watch.held)
        with controller.registry.open("w"):
            pass  # `: > registry.yaml`
        await expect_quiet(watch, 1.0)
        assert watch.held == held
        assert "the document is empty" in controller.stderr()
    finally:
        await watch.close()
