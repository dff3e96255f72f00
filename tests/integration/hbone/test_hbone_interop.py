"""Interop with independent HTTP/2 stacks over mTLS on loopback.

1. Our client tunnels through nghttpx (``--http2-proxy --verify-client``), which
   hands each CONNECT to tinyproxy, to an echo server. nghttpx keeps HTTP/2's
   small defaults (64 KiB windows, 16 KiB frames), so our flow control and frame
   sizing are exercised against another implementation.
2. A Node.js ``http2`` client tunnels through our server to an echo server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.api.spiffe import SpiffeId
from ztunnel.hbone import CloseReason, HboneClientPool, HboneConfig, relay

SERVER_ID = SpiffeId("cluster.local", "/ns/default/sa/server")
CLIENT_ID = SpiffeId("cluster.local", "/ns/default/sa/client")
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, proc: asyncio.subprocess.Process, what: str) -> None:
    for _ in range(100):
        if proc.returncode is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} is not listening on {port}")


@contextlib.asynccontextmanager
async def process(
    argv: list[str], port: int, what: str, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        await wait_listening(port, proc, what)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_our_client_through_nghttpx_and_tinyproxy(  # type: ignore[no-untyped-def]
    ca, client_cert, server_cert, echo_port, pem_files, tmp_path: Path
) -> None:
    assert shutil.which("nghttpx") and shutil.which("tinyproxy"), (
        "nghttpx and tinyproxy are required"
    )
    tp_port, h2_port = free_port(), free_port()
    (tmp_path / "tinyproxy.conf").write_text(
        f"Port {tp_port}\nListen 127.0.0.1\nAllow 127.0.0.1\nConnectPort {echo_port}\n"
        "Timeout 60\nMaxClients 20\nLogLevel Warning\n"
    )
    key, crt = pem_files(server_cert, "nghttpx")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.root_pem)
    nghttpx = [
        "nghttpx", "--conf=/dev/null", "--http2-proxy", f"--frontend=127.0.0.1,{h2_port}",
        f"--backend=127.0.0.1,{tp_port}", "--verify-client", f"--verify-client-cacert={ca_file}",
        "--workers=1", "--no-ocsp", "--log-level=WARN", "--tls-min-proto-version=TLSv1.3",
        str(key), str(crt),
    ]  # fmt: skip
    async with (
        process(
            ["tinyproxy", "-d", "-c", str(tmp_path / "tinyproxy.conf")],
            tp_port,
            "tinyproxy",
            tmp_path / "tp.log",
        ),
        process(nghttpx, h2_port, "nghttpx", tmp_path / "nghttpx.log"),
    ):
        pool = HboneClientPool(lambda: ca.bundle(), config=HboneConfig())
        try:
            payload = os.urandom(MiB) * 8
            stream = await pool.open_stream(
                client_cert, "127.0.0.1", h2_port, SERVER_ID, f"127.0.0.1:{echo_port}"
            )
            assert stream.status == 200
            ours, app = socket.socketpair()
            task = asyncio.get_running_loop().create_task(relay(stream, ours))
            reader, writer = await asyncio.open_connection(sock=app)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()

            # nghttpx does not turn END_STREAM on a CONNECT tunnel into a FIN
            # towards its HTTP/1 backend (tinyproxy itself relays half-closes),
            # so the echo is read by length and the stream closed by the test.
            sender = asyncio.get_running_loop().create_task(send())
            async with asyncio.timeout(30):
                echoed = await reader.readexactly(len(payload))
                await sender
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            stream.close()
            result = await task
            writer.close()
            assert result.bytes_up == result.bytes_down == len(payload)
            assert result.reason is CloseReason.CLOSED
        finally:
            await pool.shutdown(grace=1)


NODE_CLIENT = r"""
const http2 = require('http2');
const fs = require('fs');
const crypto = require('crypto');
const [port, authority, keyFile, certFile, caFile, size] = process.argv.slice(2);
const sha = (b) => crypto.createHash('sha256').update(b).digest('hex');
const client = http2.connect(`https://127.0.0.1:${port}`, {
  key: fs.readFileSync(keyFile), cert: fs.readFileSync(certFile), ca: fs.readFileSync(caFile),
  ALPNProtocols: ['h2'], minVersion: 'TLSv1.3', checkServerIdentity: () => undefined,
});
const done = (obj) => { console.log(JSON.stringify(obj)); client.close(); };
client.on('error', (e) => done({ error: String(e) }));
const payload = crypto.randomBytes(Number(size));
const req = client.request({ ':method': 'CONNECT', ':authority': authority });
let status = null;
const chunks = [];
req.on('response', (headers) => {
  status = headers[':status'];
  if (status === 200) { req.write(payload); req.end(); }
});
req.on('data', (c) => chunks.push(c));
req.on('end', () => {
  const got = Buffer.concat(chunks);
  done({ status, bytes: got.length, sent: sha(payload), got: sha(got) });
});
req.on('error', (e) => done({ status, error: String(e) }));
"""


async def run_node(
    port: int, authority: str, files: tuple[Path, Path, Path], script: Path, size: int
) -> dict[str, object]:
    key, crt, ca_file = files
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), str(port), authority, str(key), str(crt), str(ca_file), str(size),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


@pytest.fixture
def node_files(ca, client_cert, pem_files, tmp_path: Path) -> tuple[tuple[Path, Path, Path], Path]:  # type: ignore[no-untyped-def]
    assert shutil.which("node"), "Node.js is required"
    key, crt = pem_files(client_cert, "node-client")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.root_pem)
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    return (key, crt, ca_file), script


async def test_node_http2_client_through_our_server(harness, echo_port, node_files) -> None:  # type: ignore[no-untyped-def]
    files, script = node_files
    result = await run_node(harness.port, f"127.0.0.1:{echo_port}", files, script, 4 * MiB)
    assert result.get("error") is None, result
    assert result["status"] == 200
    assert result["bytes"] == 4 * MiB and result["got"] == result["sent"]
    request = harness.policy.seen[0].request
    assert request.peer_identity == CLIENT_ID and request.forwarded_for is None


@pytest.mark.parametrize(
    ("authority", "deny", "status"),
    [("127.0.0.2:{port}", False, 400), ("127.0.0.1:{port}", True, 401)],
)
async def test_node_client_sees_hbone_statuses(  # type: ignore[no-untyped-def]
    harness, echo_port, node_files, authority: str, deny: bool, status: int
) -> None:
    files, script = node_files
    if deny:
        harness.policy.deny.add(CLIENT_ID)
    result = await run_node(harness.port, authority.format(port=echo_port), files, script, 10)
    assert result["status"] == status and result["bytes"] == 0
