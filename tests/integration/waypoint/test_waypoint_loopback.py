"""The waypoint end to end on loopback: a real controller, the waypoint, a real
ztunnel in front of an HTTP app, and an HBONE client with checkout's identity.

checkout --HBONE (checkout's SVID, CONNECT <payments VIP>:80)--> waypoint
  --HBONE (waypoint's SVID, CONNECT <payments IP>:<app port>)--> node-b ztunnel --> app

The L7 AuthorizationPolicies and the RequestAuthentication come from the
controller's registry document, as in production. The checkout side is the
HBONE stream the source ztunnel's ``ViaWaypoint`` route opens (asserted
against node-a's own route() decision), opened by hand because loopback has no
eBPF capture.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.support.loopback_mesh import CHECKOUT, CHECKOUT_IP
from tests.support.waypoint_env import (
    FORGER,
    ISS,
    VIP,
    WAYPOINT_ID,
    WAYPOINT_IP,
    Env,
    H1Client,
    h2_exchange,
    open_tunnel,
    token,
)

pytestmark = pytest.mark.slow


async def test_policies_tokens_and_paths_through_the_waypoint(env: Env) -> None:
    client = H1Client(*await open_tunnel(env))

    status, _, body = await client.request("GET", "/pay")
    assert (status, body) == (200, b"payments saw GET /pay\n")
    status, _, body = await client.request("DELETE", "/pay")
    assert (status, body) == (403, b"RBAC: access denied")

    admin = {"authorization": f"Bearer {token(role='admin')}"}
    status, _, body = await client.request("POST", "/admin", admin, b"x=1")
    assert (status, body) == (200, b"payments saw POST /admin\n")
    status, _, _ = await client.request("POST", "/admin")
    assert status == 403
    status, _, _ = await client.request(
        "POST", "/admin", {"authorization": f"Bearer {token(role='user')}"}
    )
    assert status == 403
    for bad in (token(role="admin", exp=int(time.time()) - 300), token(FORGER, role="admin")):
        status, headers, _ = await client.request(
            "POST", "/admin", {"authorization": f"Bearer {bad}"}
        )
        assert status == 401
        assert headers["www-authenticate"].startswith("Bearer")

    # What the app saw: only the allowed requests, the token consumed (not forwarded).
    seen = [(r["method"], r["path"]) for r in env.app.seen]
    assert seen == [("GET", "/pay"), ("POST", "/admin")]
    assert "Authorization" not in env.app.seen[1]["headers"]
    assert env.app.seen[0]["headers"]["X-Forwarded-For"] == CHECKOUT_IP

    # Bypass forms against DENY /internal* (and the ALLOW list): never reach the app.
    for raw, want in [
        ("/internal", 403),
        ("/./internal", 403),
        ("//internal", 403),
        ("/%69nternal", 403),
        ("/pay/../internal", 403),
        ("/internal/", 403),
        ("/internal/..;/", 400),
        ("/pay/..;/internal", 400),
        ("/internal%2Fx", 400),
        ("/pay%5Cx", 400),
    ]:
        status, _, _ = await client.request("GET", raw)
        assert status == want, raw
    status, _, body = await client.request("GET", "/./pay//x/../")
    assert status == 200 and body == b"payments saw GET /pay/\n"
    assert len(env.app.seen) == 3

    lines = [json.loads(line) for line in env.access.lines]
    denied = next(r for r in lines if r["method"] == "DELETE")
    assert denied["status"] == 403 and denied["policy"] is None
    assert denied["reason"] == "no ALLOW policy matched"
    internal = next(r for r in lines if r["path"] == "/internal")
    assert internal["policy"] == "shop/deny-internal"
    ok = next(r for r in lines if r["method"] == "POST" and r["status"] == 200)
    assert ok["request_principal"] == f"{ISS}/alice"
    assert ok["policy"] == "shop/payments-l7"

    metrics = env.waypoint.metrics.render()
    for code in ("200", "401", "403", "400"):
        assert f'response_code="{code}"' in metrics
    assert 'source_principal="cluster.local/ns/shop/sa/checkout"' in metrics
    assert "istio_request_duration_milliseconds_bucket" in metrics
    dump = env.waypoint.admin.dump()
    assert dump["identity"] == str(WAYPOINT_ID)
    assert dump["destinations"][0]["policies"] == ["shop/deny-internal", "shop/payments-l7"]
    client.writer.close()


async def test_malformed_http_gets_400_and_the_waypoint_keeps_serving(env: Env) -> None:
    reader, writer = await open_tunnel(env)
    writer.write(b"GET /pay HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    data = await asyncio.wait_for(reader.read(4096), 10)
    assert data.startswith(b"HTTP/1.1 400")
    writer.close()
    reader, writer = await open_tunnel(env)
    writer.write(b"\x00\x01garbage\r\n\r\n")
    data = await asyncio.wait_for(reader.read(4096), 10)
    assert data.startswith(b"HTTP/1.1 400")
    writer.close()
    client = H1Client(*await open_tunnel(env))
    assert (await client.request("GET", "/pay"))[0] == 200


async def test_pipelined_requests_are_answered_in_order(env: Env) -> None:
    reader, writer = await open_tunnel(env)
    writer.write(
        b"GET /pay/1 HTTP/1.1\r\nHost: p\r\n\r\n"
        b"DELETE /pay HTTP/1.1\r\nHost: p\r\n\r\n"
        b"GET /pay/3 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    )
    data = b""
    async with asyncio.timeout(10):
        while chunk := await reader.read(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 ") == 3
    first, second, third = (data.index(s) for s in (b"GET /pay/1", b"403 ", b"GET /pay/3"))
    assert first < second < third


async def test_http2_prior_knowledge(env: Env) -> None:
    reader, writer = await open_tunnel(env)
    head = [(":path", "/pay"), (":scheme", "http"), (":authority", "payments")]
    got = await h2_exchange(
        reader,
        writer,
        [([(":method", "GET"), *head], None), ([(":method", "DELETE"), *head], None)],
    )
    statuses = {sid: int(h[b":status"]) for sid, h in got.heads.items()}
    bodies = got.bodies
    assert statuses == {1: 200, 3: 403}
    assert bodies[1] == b"payments saw GET /pay\n"
    assert 'request_protocol="http/2"' in env.waypoint.metrics.render()
    writer.close()


async def test_destinations_not_using_the_waypoint_are_refused(env: Env) -> None:
    node_a = env.mesh.nodes["node-a"]
    cert = await node_a.certs.fetch(CHECKOUT, timeout=10)
    from ztunnel.hbone import ConnectRefused

    with pytest.raises(ConnectRefused) as e:
        await node_a.pool.open_stream(
            cert, WAYPOINT_IP, env.waypoint.hbone_address[1], WAYPOINT_ID, ("10.96.0.99", 80)
        )
    assert e.value.status == 401


async def test_veilctl_shows_the_waypoints_policies_and_tunnels(env: Env) -> None:
    import io

    from agent.cli import veilctl

    client = H1Client(*await open_tunnel(env))
    assert (await client.request("GET", "/pay"))[0] == 200
    host, port = env.waypoint.admin.addresses["admin"]

    def run(*extra: str) -> tuple[int, str]:
        out = io.StringIO()
        code = veilctl.main(["waypoint", "--admin", f"{host}:{port}", *extra], out=out)
        return code, out.getvalue()

    # veilctl is synchronous; the waypoint answers on this loop meanwhile.
    code, text = await asyncio.to_thread(run)
    assert code == 0, text
    assert "shop/shop-waypoint" in text and str(WAYPOINT_ID) in text
    assert "service:shop/payments:80" in text
    assert "shop/payments-l7" in text and "waypoint: Service/payments" in text
    assert "shop/deny-internal" in text and "paths=/internal*" in text
    assert "spiffe://cluster.local/ns/shop/sa/checkout" in text  # the open tunnel's peer
    assert f"{VIP}:80" in text
    code, raw = await asyncio.to_thread(run, "-o", "json")
    doc = json.loads(raw)
    assert [a["key"] for a in doc["request_authentications"]] == ["shop/payments-jwt"]
    assert doc["request_authentications"][0]["jwt_rules"][0]["jwks"] == "inline"


async def test_keep_alive_reuses_one_upstream_tunnel(env: Env) -> None:
    client = H1Client(*await open_tunnel(env))
    for _ in range(20):
        status, _, _ = await client.request("GET", "/pay")
        assert status == 200
    assert env.waypoint.upstream.opened == 1


async def test_grpc_crosses_the_waypoint_as_http2_with_its_trailers(env: Env) -> None:
    """gRPC needs HTTP/2 end to end: its status comes in trailers."""
    reader, writer = await open_tunnel(env, 9090)

    def grpc_head(path: str) -> list[tuple[str, str]]:
        return [
            (":method", "POST"),
            (":path", path),
            (":scheme", "http"),
            (":authority", "payments:9090"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]

    empty = b"\x00\x00\x00\x00\x00"  # one empty request message
    got = await h2_exchange(
        reader,
        writer,
        [
            (grpc_head("/grpc.health.v1.Health/Check"), empty),
            (grpc_head("/grpc.health.v1.Health/Watch"), empty),
        ],
    )
    heads, bodies, trailers = got.heads, got.bodies, got.trailers
    writer.close()
    # Allowed: the real gRPC server answered SERVING (1), grpc-status 0 in the trailers.
    assert heads[1][b":status"] == b"200"
    assert bodies[1] == b"\x00\x00\x00\x00\x02\x08\x01"
    assert trailers[1][b"grpc-status"] == b"0"
    # Not in the ALLOW list: the waypoint's 403, and the gRPC server never saw it.
    assert heads[3][b":status"] == b"403"
    assert env.waypoint.proxy.upstream_h2.opened == 1
