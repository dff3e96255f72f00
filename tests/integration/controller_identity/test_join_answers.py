"""``veil node join`` as a new user meets it: the controller's real mTLS
address is stored, a timeout says which step hung, the join retries until
its timeout, and a wrong secret is called one (loopback only)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from controller.api.errors import ApiError
from controller.api.token import JoinToken
from node.credentials import load_node_credentials
from node.errors import NodeCredentialsError
from node.join import join, mtls_address_of, renew_node_certificate


@pytest.mark.parametrize(
    ("reported", "joined", "expected"),
    [
        ("", "10.0.0.1", "10.0.0.1:15012"),
        ("0.0.0.0:16012", "10.0.0.1", "10.0.0.1:16012"),
        ("[::]:16012", "ctl.example", "ctl.example:16012"),
        ("192.0.2.9:15999", "10.0.0.1", "192.0.2.9:15999"),
    ],
)
def test_mtls_address_of(reported: str, joined: str, expected: str) -> None:
    assert mtls_address_of(reported, joined) == expected


async def test_join_stores_the_address_the_controller_reports(
    controller: Any, tmp_path: Path
) -> None:
    controller.identity.mtls_address = "0.0.0.0:" + controller.mtls_address.rsplit(":", 1)[1]
    creds = await join(
        controller.join_address, controller.tokens.create("node-1"), "node-1", tmp_path / "n1"
    )
    assert creds.controller_address == controller.mtls_address
    assert load_node_credentials(tmp_path / "n1").controller_address == controller.mtls_address
    # The stored address works: the next mTLS call (`veil node certificate`) succeeds.
    renewed = await renew_node_certificate(tmp_path / "n1")
    assert renewed.cert_chain_pem != creds.cert_chain_pem


async def test_wrong_secret_is_called_invalid_secret(controller: Any, tmp_path: Path) -> None:
    token = controller.tokens.create("node-1")
    parsed = JoinToken.parse(token)
    parts = token.split(".")
    parts[2] = ("a" if parts[2][0] != "a" else "b") + parts[2][1:]
    with pytest.raises(ApiError) as e:
        await join(controller.join_address, ".".join(parts), "node-1", tmp_path / "n1")
    assert "invalid secret" in e.value.message and parsed.token_id in e.value.message


async def test_tls_handshake_timeout_is_named(controller: Any, tmp_path: Path) -> None:
    # A TCP listener that accepts and never speaks TLS.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        start = time.monotonic()
        with pytest.raises(NodeCredentialsError) as e:
            await join(
                f"127.0.0.1:{port}",
                controller.tokens.create("node-1"),
                "node-1",
                tmp_path / "n1",
                timeout=1.5,
            )
        assert "TLS handshake" in e.value.message and "timed out" in e.value.message
        assert "within --timeout 1.5s" in e.value.message
        assert time.monotonic() - start < 10
    finally:
        silent.close()


async def test_join_retries_until_the_controller_listens(controller: Any, tmp_path: Path) -> None:
    """Nothing listens at first; a forwarder to the real join listener appears
    after a second, and the join started before it succeeds."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    target_host, target_port = controller.join_address.rsplit(":", 1)

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            w.close()

    async def forward(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(target_host, int(target_port))
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    async def late_listener() -> asyncio.AbstractServer:
        await asyncio.sleep(1.0)
        return await asyncio.start_server(forward, "127.0.0.1", port)

    listener_task = asyncio.create_task(late_listener())
    try:
        creds = await join(
            f"127.0.0.1:{port}",
            controller.tokens.create("node-1"),
            "node-1",
            tmp_path / "n1",
            mtls_address=controller.mtls_address,
            timeout=15,
        )
        assert creds.node == "node-1"
    finally:
        server = await listener_task
        server.close()
        await server.wait_closed()


async def test_unreachable_until_timeout_says_so(tmp_path: Path, controller: Any) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(NodeCredentialsError) as e:
        await join(
            f"127.0.0.1:{port}",
            controller.tokens.create("node-1"),
            "node-1",
            tmp_path / "n1",
            timeout=1.0,
        )
    assert "could not join within --timeout 1s" in e.value.message
