"""Fetching, caching and refreshing the JWKS documents named by ``jwksUri``.

:meth:`JwksCache.keys` is what :class:`waypoint.authn.Authenticator` calls on
the request path: a dictionary lookup, never IO. Fetches happen in tasks:

- :meth:`ensure` fetches a URI the first time it is needed (the request that
  needs it waits, bounded by the fetch timeout) and starts tracking it;
- every tracked URI is re-fetched every ``refresh`` seconds; a failed fetch
  keeps the last good keys (logged), so an identity provider outage does not
  turn into 401s for tokens that verified a minute ago;
- a response is bounded (size, time, JSON with a ``keys`` list of usable
  keys) and the number of tracked URIs is capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import aiohttp
import jwt

from .authn import parse_jwks

__all__ = ["JwksCache", "JwksStatus"]

log = logging.getLogger("veil.waypoint.jwks")

MAX_BYTES = 256 * 1024
MAX_URIS = 64


@dataclass(slots=True)
class JwksStatus:
    uri: str
    keys: jwt.PyJWKSet | None = None
    fetched_at: float | None = None  # time.time() of the last good fetch
    last_error: str | None = None
    failures: int = 0
    attempted_at: float = 0.0  # time.monotonic() of the last attempt

    def to_json(self) -> dict[str, object]:
        return {
            "uri": self.uri,
            "keys": len(self.keys.keys) if self.keys is not None else 0,
            "fetched_at": self.fetched_at,
            "last_error": self.last_error,
            "failures": self.failures,
        }


class JwksCache:
    def __init__(
        self, *, refresh: float = 300.0, timeout: float = 5.0, retry_missing: float = 5.0
    ) -> None:
        self.refresh = refresh
        self.timeout = timeout
        # A URI that never answered is retried on demand at most this often,
        # so requests carrying tokens do not hammer a failing provider.
        self.retry_missing = retry_missing
        self._status: dict[str, JwksStatus] = {}
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None

    def keys(self, uri: str) -> jwt.PyJWKSet | None:
        st = self._status.get(uri)
        return st.keys if st is not None else None

    def statuses(self) -> list[JwksStatus]:
        return list(self._status.values())

    async def ensure(self, uris: tuple[str, ...]) -> None:
        """Fetch the URIs that never were; returns when each has keys or failed."""
        now = time.monotonic()
        missing = [
            u
            for u in uris
            if self.keys(u) is None
            and (u not in self._status or now - self._status[u].attempted_at >= self.retry_missing)
        ]
        if missing:
            await asyncio.gather(*(self._fetch_once(u) for u in missing))

    async def _fetch_once(self, uri: str) -> None:
        held = self._inflight.get(uri)
        if held is not None:
            await asyncio.shield(held)
            return
        if uri not in self._status and len(self._status) >= MAX_URIS:
            log.warning("not fetching JWKS %s: already tracking %d URIs", uri, MAX_URIS)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[uri] = fut
        try:
            await self._fetch(uri)
        finally:
            del self._inflight[uri]
            fut.set_result(None)
        self._start_refresher()

    async def _fetch(self, uri: str) -> None:
        st = self._status.setdefault(uri, JwksStatus(uri))
        st.attempted_at = time.monotonic()
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with self._session.get(uri, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(MAX_BYTES + 1)
                if len(body) > MAX_BYTES:
                    raise ValueError(f"document larger than {MAX_BYTES} bytes")
            keys = parse_jwks(body.decode("utf-8", errors="replace"))
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as e:
            st.failures += 1
            st.last_error = f"{type(e).__name__}: {e}"
            log.warning(
                "JWKS fetch from %s failed (%s); %s",
                uri,
                st.last_error,
                "keeping the last good keys" if st.keys is not None else "no keys yet",
            )
            return
        st.keys = keys
        st.fetched_at = time.time()
        st.last_error = None
        log.info("JWKS from %s: %d key(s)", uri, len(keys.keys))

    def _start_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            for uri in list(self._status):
                await self._fetch_once(uri)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._session is not None:
            await self._session.close()
            self._session = None
