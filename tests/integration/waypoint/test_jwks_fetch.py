"""jwksUri: fetched from a local server, cached, refreshed, last good keys kept."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm

from controller.api.model import JwtRule
from waypoint.authn import Authenticator
from waypoint.jwks import JwksCache

ISS = "https://idp.example"
KEY_1 = ed25519.Ed25519PrivateKey.generate()
KEY_2 = ed25519.Ed25519PrivateKey.generate()


def jwks(key: ed25519.Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    return {"keys": [{**json.loads(OKPAlgorithm.to_jwk(key.public_key())), "kid": kid}]}


def token(key: ed25519.Ed25519PrivateKey, kid: str) -> str:
    body = {"iss": ISS, "sub": "bob", "exp": int(time.time()) + 60}
    return jwt.encode(body, key, algorithm="EdDSA", headers={"kid": kid})


class IdP:
    def __init__(self) -> None:
        self.doc: dict[str, Any] | None = jwks(KEY_1, "k1")
        self.hits = 0
        self.status = 200

    async def handle(self, _request: web.Request) -> web.Response:
        self.hits += 1
        if self.status != 200 or self.doc is None:
            return web.Response(status=self.status)
        return web.json_response(self.doc)


@pytest.fixture
async def idp() -> AsyncIterator[tuple[IdP, str]]:
    server = IdP()
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}/jwks"
    finally:
        await runner.cleanup()


async def test_fetch_cache_refresh_and_keep_last_good(idp: tuple[IdP, str]) -> None:
    server, uri = idp
    cache = JwksCache(refresh=0.2, timeout=2.0)
    auth = Authenticator.compile([JwtRule(issuer=ISS, jwks_uri=uri)])
    bearer = {"authorization": f"Bearer {token(KEY_1, 'k1')}"}
    try:
        assert auth.authenticate(bearer, cache.keys).error is not None  # nothing fetched yet
        await cache.ensure(auth.jwks_uris)
        assert auth.authenticate(bearer, cache.keys).principal == f"{ISS}/bob"
        hits = server.hits
        await cache.ensure(auth.jwks_uris)
        assert server.hits == hits  # cached: no second fetch on demand

        # The identity provider fails: the last good keys stay.
        server.status = 500
        async with asyncio.timeout(5):
            while cache.statuses()[0].failures == 0:
                await asyncio.sleep(0.05)
        assert auth.authenticate(bearer, cache.keys).error is None

        # It rotates its key: the refresh picks the new one up.
        server.status = 200
        server.doc = jwks(KEY_2, "k2")
        rotated = {"authorization": f"Bearer {token(KEY_2, 'k2')}"}
        async with asyncio.timeout(5):
            while auth.authenticate(rotated, cache.keys).error is not None:
                await asyncio.sleep(0.05)
        assert auth.authenticate(bearer, cache.keys).error is not None  # k1 is gone
    finally:
        await cache.close()


async def test_bad_documents_never_replace_keys(idp: tuple[IdP, str]) -> None:
    server, uri = idp
    server.doc = {"keys": "nope"}
    cache = JwksCache(refresh=60, timeout=2.0)
    try:
        await cache.ensure((uri,))
        assert cache.keys(uri) is None
        assert "keys" in (cache.statuses()[0].last_error or "")
    finally:
        await cache.close()
