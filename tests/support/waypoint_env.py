"""The waypoint on loopback, shared by the waypoint's integration tests.

A real controller (registry document with L7 AuthorizationPolicies and a
RequestAuthentication), node-a and node-b ztunnels in-process, the waypoint,
and behind node-b an HTTP app (aiohttp) and a real gRPC server (the standard
health service) as the payments workload. :func:`open_tunnel` is the HBONE
stream checkout's ztunnel opens for the payments VIP (``ViaWaypoint``),
opened by hand because loopback has no eBPF capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h11
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2_grpc
from jwt.algorithms import ECAlgorithm

from controller.api.spiffe import workload_identity
from tests.support.controller import ControllerProcess
from tests.support.loopback_mesh import CHECKOUT, CHECKOUT_IP, PAYMENTS_IP, AccessLog, Mesh
from tests.support.registry_docs import mesh_doc, workload
from waypoint.app import Waypoint
from waypoint.config import WaypointConfig
from ztunnel.hbone import relay
from ztunnel.proxy.route import ViaWaypoint, route

WAYPOINT_IP = "127.0.40.1"
VIP = "10.96.0.20"
ISS = "https://idp.example"
WAYPOINT_ID = workload_identity("cluster.local", "shop", "shop-waypoint")
SIGNING = ec.generate_private_key(ec.SECP256R1())
FORGER = ec.generate_private_key(ec.SECP256R1())
_JWK = json.loads(ECAlgorithm.to_jwk(SIGNING.public_key()))
JWKS = json.dumps({"keys": [{**_JWK, "kid": "k1"}]})


def token(key: Any = SIGNING, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "sub": "alice", "aud": "payments", "exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": "k1"})


POLICIES = [
    {
        "name": "payments-l7",
        "namespace": "shop",
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "payments"}],
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/checkout"]}}],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/pay", "/pay/*"]}}],
                },
                {
                    "to": [{"operation": {"methods": ["POST"], "paths": ["/admin"]}}],
                    "when": [{"key": "request.auth.claims[role]", "values": ["admin"]}],
                },
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/checkout"]}}],
                    "to": [
                        {
                            "operation": {
                                "paths": ["/grpc.health.v1.Health/Check", "/veil.test.Echo/*"]
                            }
                        },
                        {"operation": {"methods": ["POST"], "paths": ["/upload"]}},
                    ],
                },
            ],
        },
    },
    {
        "name": "deny-internal",
        "namespace": "shop",
        "spec": {
            "targetRefs": [{"kind": "Gateway", "name": "shop-waypoint"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/internal*"]}}]}],
        },
    },
]
REQUEST_AUTHENTICATIONS = [
    {
        "name": "payments-jwt",
        "namespace": "shop",
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "payments"}],
            "jwtRules": [{"issuer": ISS, "audiences": ["payments"], "jwks": JWKS}],
        },
    },
]


async def _chat(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    """A bidirectional gRPC stream that answers each message as it comes."""
    async for message in requests:
        yield b"echo " + message


# Raw bytes in and out (no serializers): veil.test.Echo/Chat.
_ECHO = grpc.method_handlers_generic_handler(
    "veil.test.Echo", {"Chat": grpc.stream_stream_rpc_method_handler(_chat)}
)


@dataclass
class HttpApp:
    port: int
    runner: web.AppRunner
    seen: list[dict[str, Any]] = field(default_factory=list)


async def start_http_app(sock: socket.socket) -> HttpApp:
    app = web.Application()
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(
            {"method": request.method, "path": request.raw_path, "headers": dict(request.headers)}
        )
        if request.raw_path == "/upload":
            # Hash the body as it streams in: what arrived, byte for byte.
            digest, size = hashlib.sha256(), 0
            async for piece in request.content.iter_any():
                digest.update(piece)
                size += len(piece)
            return web.Response(text=f"{size} {digest.hexdigest()}\n")
        return web.Response(text=f"payments saw {request.method} {request.raw_path}\n")

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        seen.append({"method": "GET", "path": request.raw_path, "headers": dict(request.headers)})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                await ws.send_str(f"echo {msg.data}")
        return ws

    app.router.add_get("/pay/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return HttpApp(sock.getsockname()[1], runner, seen)


def registry(app_port: int, grpc_port: int) -> dict[str, Any]:
    doc = mesh_doc(
        [
            workload("checkout", "shop", "node-a", CHECKOUT_IP),
            workload("payments", "shop", "node-b", PAYMENTS_IP),
            workload(
                "shop-waypoint", "shop", "node-w", WAYPOINT_IP,
                **{"veil.io/waypoint": "shop-waypoint"},
            ),
        ]
    )  # fmt: skip
    doc["namespaces"][0]["labels"]["veil.io/use-waypoint"] = "shop-waypoint"
    doc["services"] = [
        {"name": "payments", "namespace": "shop", "vips": [VIP],
         "ports": [{"name": "http", "port": 80, "targetPort": app_port},
                   {"name": "grpc", "port": 9090, "targetPort": grpc_port}],
         "selector": {"app": "payments"}},
    ]  # fmt: skip
    doc["authorizationPolicies"] = POLICIES
    doc["requestAuthentications"] = REQUEST_AUTHENTICATIONS
    return doc


@dataclass
class Env:
    waypoint: Waypoint
    mesh: Mesh
    app: HttpApp
    access: AccessLog


@contextlib.asynccontextmanager
async def waypoint_env(tmp_path: Path) -> AsyncIterator[Env]:
    """The whole loopback set-up; everything it started is stopped on exit."""
    app_sock = socket.socket()
    app_sock.bind((PAYMENTS_IP, 0))
    app = await start_http_app(app_sock)
    # A real gRPC server (the standard health service) behind the same workload.
    grpc_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), grpc_server)
    grpc_server.add_generic_rpc_handlers((_ECHO,))
    grpc_port = grpc_server.add_insecure_port(f"{PAYMENTS_IP}:0")
    await grpc_server.start()
    ctrl = ControllerProcess(tmp_path, registry(app.port, grpc_port))
    ctrl.start()
    mesh = Mesh(ctrl, tmp_path)
    access = AccessLog()
    access_logger = logging.getLogger("veil.waypoint.access")
    level = access_logger.level
    access_logger.setLevel(logging.INFO)
    access_logger.addHandler(access)
    wp: Waypoint | None = None
    try:
        await mesh.start_node("node-a", CHECKOUT_IP)
        node_b = await mesh.start_node("node-b", PAYMENTS_IP)
        state = tmp_path / "node-w-state"
        await ctrl.join("node-w", state)
        wp = Waypoint(
            WaypointConfig(
                node_name="node-w",
                namespace="shop",
                name="shop-waypoint",
                state_dir=state,
                listen_address=WAYPOINT_IP,
                hbone_port=0,
                peer_hbone_port=node_b.address("hbone")[1],
                admin_address=("127.0.0.1", 0),
                metrics_address=("127.0.0.1", 0),
                connect_timeout=5.0,
                drain_grace_period=0.5,
            )
        )
        await wp.start(sync_timeout=15)
        yield Env(wp, mesh, app, access)
    finally:
        if wp is not None:
            await wp.shutdown(grace=0.5)
        await mesh.close()
        access_logger.removeHandler(access)
        access_logger.setLevel(level)
        await app.runner.cleanup()
        await grpc_server.stop(None)
        ctrl.stop()


async def open_tunnel(
    env: Env, port: int = 80
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    node_a = env.mesh.nodes["node-a"]
    # What checkout's ztunnel decides for the payments VIP: this very tunnel.
    decision = route(node_a.store.current, CHECKOUT_IP, VIP, port)
    assert isinstance(decision, ViaWaypoint), decision
    assert decision.hbone_addr[0] == WAYPOINT_IP
    assert decision.expected_identity == WAYPOINT_ID
    assert (decision.dst_ip, decision.dst_port) == (VIP, port)
    cert = await node_a.certs.fetch(CHECKOUT, timeout=10)
    stream = await node_a.pool.open_stream(
        cert,
        WAYPOINT_IP,
        env.waypoint.hbone_address[1],
        WAYPOINT_ID,
        (VIP, port),
        forwarded_for=(CHECKOUT_IP, 40000),
    )
    mine, theirs = socket.socketpair()
    asyncio.get_running_loop().create_task(relay(stream, theirs))
    return await asyncio.open_connection(sock=mine)


class H1Client:
    """Keep-alive HTTP/1.1 over one tunnel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        hs = [("host", "payments.shop.svc.cluster.local"), *(headers or {}).items()]
        if body:
            hs.append(("content-length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target=target, headers=hs)) or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        self.writer.write(out)
        status, rheaders, data = 0, {}, b""
        async with asyncio.timeout(10):
            while True:
                ev = self.conn.next_event()
                if ev is h11.NEED_DATA:
                    self.conn.receive_data(await self.reader.read(65536))
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                    rheaders = {k.decode(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h11.Data):
                    data += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    return status, rheaders, data
                else:
                    raise AssertionError(f"unexpected {ev!r}")


@dataclass
class H2Answers:
    """What came back on each HTTP/2 stream of :func:`h2_exchange`."""

    heads: dict[int, dict[bytes, bytes]] = field(default_factory=dict)
    bodies: dict[int, bytes] = field(default_factory=dict)
    trailers: dict[int, dict[bytes, bytes]] = field(default_factory=dict)


async def h2_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    requests: list[tuple[list[tuple[str, str]], bytes | None]],
) -> H2Answers:
    """Sends each (headers, body) on its own stream (body None: none, END_STREAM
    on the headers) and reads until every stream ended."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sids = []
    for headers, body in requests:
        sid = conn.get_next_available_stream_id()
        sids.append(sid)
        conn.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            conn.send_data(sid, body, end_stream=True)
    writer.write(conn.data_to_send())
    out = H2Answers(bodies=dict.fromkeys(sids, b""))
    ended: set[int] = set()
    async with asyncio.timeout(10):
        while ended != set(sids):
            data = await reader.read(65536)
            assert data, "the waypoint closed the HTTP/2 connection"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    out.heads[ev.stream_id] = dict(ev.headers or [])
                elif isinstance(ev, h2.events.TrailersReceived):
                    out.trailers[ev.stream_id] = dict(ev.headers or [])
                elif isinstance(ev, h2.events.DataReceived):
                    out.bodies[ev.stream_id] += ev.data or b""
                    conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended.add(ev.stream_id)
            writer.write(conn.data_to_send())
    return out
