import asyncio, socket, os
from controller.api.spiffe import SpiffeId
from ztunnel.hbone import relay

SERVER_ID = SpiffeId("cluster.local", "/ns/default/sa/server")

async def test_smoke(harness, client_cert, echo_port):
    stream = await harness.pool.open_stream(client_cert, "127.0.0.1", harness.port, SERVER_ID, f"127.0.0.1:{echo_port}", ("10.1.1.1", 1234))
    a, b = socket.socketpair()
    task = asyncio.create_task(relay(stream, a))
    reader, writer = await asyncio.open_connection(sock=b)
    payload = os.urandom(1 << 20) * 8
    async def send():
        writer.write(payload); await writer.drain(); writer.write_eof()
    st = asyncio.create_task(send())
    got = bytearray()
    while chunk := await reader.read(1 << 20):
        got += chunk
    await st
    assert bytes(got) == payload
    res = await task
    print(res)
    writer.close()
    req = harness.policy.seen[0].request
    print(req)
