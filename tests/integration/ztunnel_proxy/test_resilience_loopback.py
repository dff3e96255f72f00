"""Bad peers, controller outages and certificate rotation, end to end on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from controller.ca import CertificateAuthority
from tests.support.loopback_mesh import (
    CHECKOUT,
    CHECKOUT_IP,
    OTHER,
    PAYMENTS,
    PAYMENTS_IP,
    App,
    Mesh,
    Tunnel,
    open_tunnel,
)
from ztunnel.hbone import HboneClientPool, HboneConnectError, relay
from ztunnel.identity import WorkloadCertificate, build_csr, generate_key, key_pem


def foreign_certificate(work: Path) -> WorkloadCertificate:
    """checkout's identity, signed by a CA this mesh does not trust."""
    ca = CertificateAuthority.load_or_create(work / "foreign-ca", "cluster.local")
    key = generate_key()
    chain = ca.sign_csr(build_csr(key, CHECKOUT), CHECKOUT, timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(chain[0])
    return WorkloadCertificate(
        identity=CHECKOUT,
        key_pem=key_pem(key),
        chain_pem=tuple(chain),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
    )


async def test_peer_with_certificate_from_another_ca_is_refused(
    mesh: Mesh, app: App, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node_a, node_b = await mesh.start_pair()
    pool = HboneClientPool(node_a.trust_bundle)
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(HboneConnectError):
            await pool.open_stream(
                foreign_certificate(tmp_path),
                PAYMENTS_IP,
                node_b.address("hbone")[1],
                PAYMENTS,
                (PAYMENTS_IP, app.port),
                forwarded_for=(CHECKOUT_IP, 1),
            )
    finally:
        await pool.shutdown(0.1)
    assert app.peers == []
    assert any("TLS handshake" in r.getMessage() for r in caplog.records)


async def test_server_with_unexpected_identity_is_refused(mesh: Mesh, app: App) -> None:
    """The client requires the destination workload's identity, literally."""
    node_a, node_b = await mesh.start_pair()
    cert = await node_a.certs.fetch(CHECKOUT, timeout=10)
    with pytest.raises(HboneConnectError) as info:
        await node_a.pool.open_stream(
            cert,
            PAYMENTS_IP,
            node_b.address("hbone")[1],
            OTHER,  # payments' ztunnel presents payments, not other
            (PAYMENTS_IP, app.port),
        )
    assert str(OTHER) in str(info.value) or "identity" in str(info.value).lower()
    assert app.peers == []


async def test_controller_outage_keeps_existing_and_new_connections(mesh: Mesh, app: App) -> None:
    node_a, node_b = await mesh.start_pair()
    t = await open_tunnel(node_a, node_b, app.port)
    await t.reader.readline()
    mesh.controller.stop()
    for _ in range(50):
        if not node_b.watch.status().connected and not node_a.watch.status().connected:
            break
        await asyncio.sleep(0.1)
    assert not node_b.watch.status().connected

    t.writer.write(b"still here")
    assert await t.reader.readexactly(10) == b"still here"
    # A new tunnel on a new HBONE connection: both ztunnels serve from the
    # state and certificates they hold.
    cert = await node_a.certs.fetch(CHECKOUT, timeout=5)
    pool = HboneClientPool(node_a.trust_bundle)
    stream = await pool.open_stream(
        cert,
        PAYMENTS_IP,
        node_b.address("hbone")[1],
        PAYMENTS,
        (PAYMENTS_IP, app.port),
        forwarded_for=(CHECKOUT_IP, 2),
    )
    mine, theirs = socket.socketpair()
    task = asyncio.create_task(relay(stream, theirs))
    reader, writer = await asyncio.open_connection(sock=mine)
    fresh = Tunnel(reader, writer, task, stream)
    assert await fresh.reader.readline() == f"peer {CHECKOUT_IP}\n".encode()
    fresh.writer.write(b"new")
    assert await fresh.reader.readexactly(3) == b"new"
    for tun in (t, fresh):
        tun.writer.close()
        await asyncio.wait_for(tun.task, 5)
    await pool.shutdown(0.1)


@pytest.mark.slow
async def test_rotation_during_long_transfer_drops_nothing(short_ttl_mesh: Mesh, app: App) -> None:
    """10 s certificates rotate at half-life; a 12 s transfer and a new tunnel
    every second all complete byte for byte."""
    node_a, node_b = await short_ttl_mesh.start_pair()
    first_a = (await node_a.certs.fetch(CHECKOUT, timeout=10)).serial
    first_b = (await node_b.certs.fetch(PAYMENTS, timeout=10)).serial
    long = await open_tunnel(node_a, node_b, app.port)
    await long.reader.readline()

    async def pump() -> None:
        deadline = asyncio.get_running_loop().time() + 12
        while asyncio.get_running_loop().time() < deadline:
            chunk = os.urandom(32 * 1024)
            long.writer.write(chunk)
            assert await long.reader.readexactly(len(chunk)) == chunk
            await asyncio.sleep(0.02)

    async def new_tunnels() -> int:
        made = 0
        for i in range(11):
            await asyncio.sleep(1)
            t = await open_tunnel(node_a, node_b, app.port)
            assert await t.reader.readline() == f"peer {CHECKOUT_IP}\n".encode()
            t.writer.write(b"%d" % i)
            assert await t.reader.readexactly(len(b"%d" % i)) == b"%d" % i
            t.writer.close()
            await asyncio.wait_for(t.task, 5)
            made += 1
        return made

    _, made = await asyncio.gather(pump(), new_tunnels())
    assert made == 11
    long.writer.write_eof()
    assert await long.reader.read() == b""
    long.writer.close()
    await asyncio.wait_for(long.task, 5)
    rotated_a = node_a.certs.get(CHECKOUT)
    rotated_b = node_b.certs.get(PAYMENTS)
    assert rotated_a is not None and rotated_a.serial != first_a
    assert rotated_b is not None and rotated_b.serial != first_b
    assert rotated_a.not_after > datetime.now(UTC)
