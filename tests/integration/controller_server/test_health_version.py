"""``GET /version`` on the controller's health endpoint, as ``--version`` reads it."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from agent.cli import veilctl
from agent.cli.controller_version import fetch_controller_version
from controller.config import ListenAddress
from controller.health import HealthServer, HealthState, controller_version, fetch_health


async def test_version_endpoint_and_ready_document(tmp_path: Path) -> None:
    server = HealthServer(HealthState())
    await server.start(ListenAddress("127.0.0.1", 0))
    try:
        addr = f"127.0.0.1:{server.port}"
        found = await asyncio.to_thread(fetch_controller_version, addr, tmp_path)
        assert (found.version, found.error) == (controller_version(), None)
        _, doc = await asyncio.to_thread(fetch_health, ListenAddress("127.0.0.1", server.port))
        assert doc["version"] == controller_version()
        out = io.StringIO()
        code = await asyncio.to_thread(
            veilctl.main,
            ["--agent-socket", str(tmp_path / "none"), "--ztunnel-admin", "127.0.0.1:1",
             "--controller-health", addr, "--version"],
            out,
        )  # fmt: skip
        assert code == 0
        assert f"controller: {controller_version()}\n" in out.getvalue()
    finally:
        await server.stop()


def test_unjoined_node_without_an_address_says_what_to_pass(tmp_path: Path) -> None:
    found = fetch_controller_version(None, tmp_path)
    assert found.version is None and found.error is not None
    assert "--controller-health" in found.error
    down = fetch_controller_version("127.0.0.1:1", tmp_path, timeout=1.0)
    assert down.version is None and "cannot reach" in (down.error or "")
