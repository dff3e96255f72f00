"""mTLS identity refusals over real sockets: every bad certificate is refused, and the
server keeps serving good clients afterwards."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta

import pytest

from controller.api.spiffe import SpiffeId
from ztunnel.hbone import HboneClientPool, HboneConnectError
from ztunnel.tls import client_context

SERVER_ID = SpiffeId("cluster.local", "/ns/default/sa/server")
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = str(SERVER_ID)
PAST = datetime.now(UTC) - timedelta(hours=2)


async def assert_server_still_serves(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    fresh = HboneClientPool(lambda: harness.ca.bundle(), config=harness.config)
    try:
        stream = await fresh.open_stream(
            client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}"
        )
        assert stream.status == 200
        stream.close()
    finally:
        await fresh.shutdown(grace=0.2)


async def open_with(harness, cert, expected: SpiffeId = SERVER_ID, bundle=None) -> None:  # type: ignore[no-untyped-def]
    pool = HboneClientPool(lambda: bundle or harness.ca.bundle(), config=harness.config)
    try:
        await pool.open_stream(cert, "127.0.0.1", harness.port, expected, "127.0.0.1:9")
    finally:
        await pool.shutdown(grace=0.2)


@pytest.mark.parametrize(
    ("describe", "server_uris", "expected", "message"),
    [
        (
            "wrong SAN",
            ["spiffe://cluster.local/ns/default/sa/impostor"],
            SERVER_ID,
            "expected spiffe://",
        ),
        (
            "foreign trust domain",
            ["spiffe://evil.example/ns/default/sa/server"],
            SpiffeId("evil.example", "/ns/default/sa/server"),
            "trust domain",
        ),
        ("several URI SANs", [SERVER, "spiffe://cluster.local/ns/x/sa/y"], SERVER_ID, "2 URI SANs"),
        ("no URI SAN", [], SERVER_ID, "0 URI SANs"),
    ],
)
async def test_client_refuses_bad_server_identity(  # type: ignore[no-untyped-def]
    harness, client_cert, echo_port, describe, server_uris, expected, message
) -> None:
    harness.server_cert = harness.ca.issue(SERVER, uris=server_uris)
    with pytest.raises(HboneConnectError, match=message):
        await open_with(harness, client_cert, expected)
    assert harness.policy.seen == []


@pytest.mark.parametrize("case", ["expired", "other CA"])
async def test_client_refuses_unverifiable_server_chain(harness, client_cert, case) -> None:  # type: ignore[no-untyped-def]
    if case == "expired":
        harness.server_cert = harness.ca.issue(
            SERVER, not_before=PAST - timedelta(hours=1), not_after=PAST
        )
    else:
        harness.server_cert = type(harness.ca)().issue(SERVER)
    with pytest.raises(HboneConnectError, match="certificate verify failed"):
        await open_with(harness, client_cert)


@pytest.mark.parametrize(
    "case", ["foreign trust domain", "several URI SANs", "no URI SAN", "expired", "other CA"]
)
async def test_server_refuses_bad_client_certificates(
    harness, client_cert, echo_port, case
) -> None:  # type: ignore[no-untyped-def]
    ca = harness.ca
    bad = {
        "foreign trust domain": lambda: ca.issue("spiffe://evil.example/ns/default/sa/client"),
        "several URI SANs": lambda: ca.issue(
            CLIENT, uris=[CLIENT, "spiffe://cluster.local/ns/a/sa/b"]
        ),
        "no URI SAN": lambda: ca.issue(CLIENT, uris=[]),
        "expired": lambda: ca.issue(CLIENT, not_before=PAST - timedelta(hours=1), not_after=PAST),
        "other CA": lambda: type(ca)().issue(CLIENT),
    }[case]()
    # The client trusts the server; only the server can refuse this one.
    with pytest.raises(HboneConnectError):
        await open_with(harness, bad)
    assert harness.policy.seen == []
    await assert_server_still_serves(harness, client_cert, echo_port)


async def raw_tls(port: int, ctx: ssl.SSLContext, data: bytes) -> bytes:
    """Connect with an arbitrary TLS client, send ``data``, return what comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=None)
    writer.write(data)
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()


async def test_server_refuses_alpn_other_than_h2(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    ctx = client_context(client_cert, harness.ca.bundle())
    ctx.set_alpn_protocols(["http/1.1"])
    assert await raw_tls(harness.port, ctx, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n") == b""
    await assert_server_still_serves(harness, client_cert, echo_port)


async def test_no_h2c_plaintext_prior_knowledge(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    from ztunnel.hbone.http2 import frames

    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    writer.write(frames.PREFACE + frames.settings_frame([]))
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert not answer.startswith(b"\x00")  # no HTTP/2 frame: only a TLS alert or nothing
    assert harness.policy.seen == []
    await assert_server_still_serves(harness, client_cert, echo_port)


async def test_unknown_destination_gets_no_handshake(harness, client_cert) -> None:  # type: ignore[no-untyped-def]
    harness.server_cert = None  # select_cert finds no local workload for the address
    with pytest.raises(HboneConnectError):
        await open_with(harness, client_cert)


NODE = "spiffe://cluster.local/veil/node/node-1"


async def test_server_refuses_a_node_identity_as_client(harness, client_cert, echo_port) -> None:  # type: ignore[no-untyped-def]
    # A node certificate chains to the same CA, and its key sits on the node's disk.
    with pytest.raises(HboneConnectError, match="node identity"):
        await open_with(harness, harness.ca.issue(NODE))
    assert harness.policy.seen == []
    await assert_server_still_serves(harness, client_cert, echo_port)


async def test_client_refuses_a_node_identity_as_server(harness, client_cert) -> None:  # type: ignore[no-untyped-def]
    harness.server_cert = harness.ca.issue(NODE)
    with pytest.raises(HboneConnectError, match="node identity"):
        await open_with(harness, client_cert, SpiffeId("cluster.local", "/veil/node/node-1"))
    assert harness.policy.seen == []


@pytest.mark.parametrize("key_type", ["p384", "rsa2048"])
async def test_server_refuses_client_leaves_that_are_not_p256(
    harness, client_cert, echo_port, key_type
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(HboneConnectError, match="P-256"):
        await open_with(harness, harness.ca.issue(CLIENT, key_type=key_type))
    assert harness.policy.seen == []
    await assert_server_still_serves(harness, client_cert, echo_port)


@pytest.mark.parametrize("key_type", ["p384", "rsa2048"])
async def test_client_refuses_server_leaves_that_are_not_p256(
    harness, client_cert, key_type
) -> None:  # type: ignore[no-untyped-def]
    harness.server_cert = harness.ca.issue(SERVER, key_type=key_type)
    with pytest.raises(HboneConnectError, match="P-256"):
        await open_with(harness, client_cert)
    assert harness.policy.seen == []
