"""Torn, partial and drastic registry writes never reach the registry's subscribers.

The watcher runs for real (inotify and polling) on files in a temporary
directory; a writer truncates the file and writes it in chunks with pauses, as
a shell redirection or a slow editor does. Every state the holder publishes is
recorded and must be one of the complete documents.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from controller.api.model import RegistryState
from controller.registry import RegistryError, RegistryFileWatcher, RegistryHolder

HEAD = """trustDomain: cluster.local
namespaces:
  - {name: shop, labels: {veil.io/dataplane-mode: ambient}}
workloads:
"""
POLICIES = """authorizationPolicies:
  - name: payments-from-checkout
    namespace: shop
    spec:
      selector: {matchLabels: {app: w0}}
      rules:
        - from: [{source: {principals: [cluster.local/ns/shop/sa/default]}}]
peerAuthentications:
  - {name: strict, namespace: shop, spec: {mtls: {mode: STRICT}}}
"""


def registry(count: int, base: int = 1) -> str:
    lines = [
        f"  - {{name: w{i}, namespace: shop, node: n1, ips: [10.0.0.{base + i}], "
        f"labels: {{app: w{i}}}}}\n"
        for i in range(count)
    ]
    return HEAD + "".join(lines) + POLICIES


def keys(state: RegistryState) -> tuple[tuple[str, ...], int, int]:
    return (
        tuple(f"{w.key}={w.ips[0]}" for w in state.workloads),
        len(state.authorization_policies),
        len(state.peer_authentications),
    )


class Recorder:
    """Every state the holder publishes, and every error it is told about."""

    def __init__(self, holder: RegistryHolder) -> None:
        self.states: list[RegistryState] = []
        self.errors: list[RegistryError] = []
        self.changed = asyncio.Event()
        holder.subscribe(self._on_state)
        report = holder.report_error

        def on_error(error: RegistryError) -> None:
            self.errors.append(error)
            report(error)

        holder.report_error = on_error  # type: ignore[method-assign]

    def _on_state(self, state: RegistryState) -> None:
        self.states.append(state)
        self.changed.set()

    async def wait(self, timeout: float = 10.0) -> RegistryState:
        await asyncio.wait_for(self.changed.wait(), timeout)
        self.changed.clear()
        return self.states[-1]


@asynccontextmanager
async def running(
    path: Path, *, interval: float = 0.05, settle: float = 0.1, hold: float = 1.0
) -> AsyncIterator[tuple[RegistryHolder, Recorder, RegistryFileWatcher]]:
    holder = RegistryHolder(trust_domain="cluster.local")
    watcher = RegistryFileWatcher(path, holder, interval=interval, settle=settle, hold=hold)
    watcher.load_initial()
    recorder = Recorder(holder)
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(0.1)  # let run() set up its inotify watch
    try:
        yield holder, recorder, watcher
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def write_in_chunks(path: Path, text: str, chunk: int, pause: float) -> None:
    """Truncates ``path`` and writes ``text`` into it piece by piece, one open file."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        for start in range(0, len(data), chunk):
            await asyncio.sleep(pause)
            os.write(fd, data[start : start + chunk])
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("chunk", "pause"),
    [
        (40, 0.03),  # pauses shorter than the settle window
        (200, 0.25),  # pauses longer than it: only close-write tracking protects
    ],
)
async def test_chunked_rewrite_never_publishes_an_intermediate_state(
    tmp_path: Path, chunk: int, pause: float
) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(registry(6))
    final = registry(6, base=101)
    async with running(path) as (holder, recorder, _):
        await write_in_chunks(path, final, chunk, pause)
        state = await recorder.wait()
        await asyncio.sleep(0.3)  # nothing else may follow
    assert [keys(s) for s in recorder.states] == [keys(state)]
    assert keys(state) == (tuple(f"shop/w{i}=10.0.0.{101 + i}" for i in range(6)), 1, 1)
    # The half-written versions were never even parsed: no error was reported.
    assert recorder.errors == [] and holder.last_error is None


async def test_chunked_rewrite_in_a_registry_directory(tmp_path: Path) -> None:
    d = tmp_path / "registry.d"
    d.mkdir()
    (d / "00-shop.yaml").write_text(registry(4))
    (d / "10-more.yaml").write_text("workloads: []\n")
    async with running(d) as (holder, recorder, _):
        more = "workloads:\n" + "".join(
            f"  - {{name: x{i}, namespace: shop, node: n2, ips: [10.0.1.{i}]}}\n" for i in range(5)
        )
        await write_in_chunks(d / "10-more.yaml", more, 30, 0.2)
        state = await recorder.wait()
        await asyncio.sleep(0.3)
    assert len(recorder.states) == 1 and len(state.workloads) == 9
    assert recorder.errors == [] and holder.last_error is None


async def test_truncation_alone_is_an_error_not_an_empty_mesh(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(registry(3))
    async with running(path) as (holder, recorder, _):
        before = holder.current()
        with path.open("w"):
            pass  # `: > registry.yaml`: truncated and closed, nothing written
        deadline = time.monotonic() + 5
        while holder.last_error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert holder.current() is before and recorder.states == []
        assert "empty" in str(holder.last_error) and "workloads: []" in str(holder.last_error)

        # The second half of `: > f; cat new > f`: the full content is applied.
        path.write_text(registry(3, base=50))
        state = await recorder.wait()
    assert keys(state)[0][0] == "shop/w0=10.0.0.50" and holder.last_error is None


async def test_file_cut_before_the_policies_is_held_then_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Everything before ``authorizationPolicies:`` is valid YAML but drops every policy."""
    path = tmp_path / "registry.yaml"
    full = registry(4)
    path.write_text(full)
    caplog.set_level(logging.INFO, logger="veil.controller.registry")
    async with running(path, hold=1.5) as (holder, recorder, _):
        cut = full[: full.index("authorizationPolicies:")]
        path.write_text(cut)  # a completed write of the cut file
        await asyncio.sleep(0.8)  # well past the settle window, short of the hold
        assert recorder.states == [] and holder.current().authorization_policies
        held = holder.status().held
        assert held is not None and "removes all 1 authorizationPolicies" in held
        assert "removes all 1 peerAuthentications" in held
        warning = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any("holding it back" in r.getMessage() for r in warning)

        completed = registry(5)  # the writer finishes: one more workload, policies intact
        path.write_text(completed)
        state = await recorder.wait()
        await asyncio.sleep(1.5)  # past the hold: the cut version must not come back
    assert [keys(s) for s in recorder.states] == [keys(state)]
    assert keys(state)[1:] == (1, 1) and len(state.workloads) == 5
    assert holder.status().held is None
    summary = [r.getMessage() for r in caplog.records if "registry reloaded" in r.getMessage()]
    assert summary and "workloads +1 (shop/w4)" in summary[-1]


async def test_drastic_removal_is_applied_once_stable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(registry(6))
    caplog.set_level(logging.INFO, logger="veil.controller.registry")
    async with running(path, hold=1.0) as (holder, recorder, _):
        start = time.monotonic()
        path.write_text(registry(2))  # removes 4 of 6 workloads: on purpose this time
        state = await recorder.wait()
        waited = time.monotonic() - start
    assert waited >= 1.0
    assert len(state.workloads) == 2 and holder.status().held is None
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("removes 4 of 6 workloads" in m and "holding it back" in m for m in messages)
    assert any("applying the held-back version" in m for m in messages)
    info = [r.getMessage() for r in caplog.records if "registry reloaded" in r.getMessage()]
    assert "workloads -4 (shop/w2, shop/w3, shop/w4, ... 1 more)" in info[-1]


async def test_explicit_empty_registry_is_applied_after_the_hold(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(registry(2))
    async with running(path, hold=0.5) as (holder, recorder, _):
        path.write_text("workloads: []\n")
        state = await recorder.wait()
    assert state.workloads == () and state.authorization_policies == ()
    assert holder.last_error is None


async def test_small_edit_is_published_within_the_settle_window(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(registry(4))
    async with running(path, interval=30, settle=0.1) as (_, recorder, _):
        start = time.monotonic()
        tmp = tmp_path / ".registry.yaml.new"
        tmp.write_text(registry(5))
        os.replace(tmp, path)
        await recorder.wait()
        elapsed = time.monotonic() - start
    # inotify woke it (the poll is 30 s away); generous bound for a shared machine.
    assert elapsed < 5


async def test_warnings_are_logged_and_kept_in_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "registry.yaml"
    doc = (
        registry(2)
        .replace("{matchLabels: {app: w0}}", "{matchLabels: {app: gone}}")
        .replace("cluster.local/ns/shop/sa/default", "example.org/ns/shop/sa/default")
    )
    path.write_text(doc)
    caplog.set_level(logging.WARNING, logger="veil.controller.registry")
    holder = RegistryHolder(trust_domain="cluster.local")
    RegistryFileWatcher(path, holder).load_initial()
    warnings = holder.status().warnings
    assert len(warnings) == 2
    assert any("trust domain 'example.org'" in w and "principals[0]" in w for w in warnings)
    assert any("app=gone matches no workload in namespace shop" in w for w in warnings)
    assert sum(1 for r in caplog.records if r.levelno == logging.WARNING) == 2


async def test_in_place_writes_wait_the_settle_window_renames_do_not(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(registry(4))
    async with running(path, interval=30, settle=1.0) as (_, recorder, _):
        start = time.monotonic()
        path.write_text(registry(5))  # in place: same inode
        await recorder.wait()
        in_place = time.monotonic() - start

        start = time.monotonic()
        tmp = tmp_path / ".registry.yaml.new"
        tmp.write_text(registry(4))
        os.replace(tmp, path)  # a new inode: complete before it appeared
        await recorder.wait()
        renamed = time.monotonic() - start
    assert in_place >= 1.0
    assert renamed < 0.9
