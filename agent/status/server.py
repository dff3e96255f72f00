"""Serves the agent's status routes on a unix socket with aiohttp."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

__all__ = ["StatusServer"]

log = logging.getLogger("veil.agent.status")

Handler = Callable[[], Awaitable[Any]]


class StatusServer:
    """Maps GET paths to coroutines returning JSON-serialisable data."""

    def __init__(self, socket_path: pathlib.Path) -> None:
        self.socket_path = socket_path
        self._routes: dict[str, Handler] = {}
        self._runner: web.AppRunner | None = None

    def route(self, path: str, handler: Handler) -> None:
        self._routes[path] = handler

    async def _dispatch(self, request: web.Request) -> web.Response:
        handler = self._routes.get(request.path)
        if handler is None:
            return web.json_response(
                {"error": f"unknown path {request.path}", "paths": sorted(self._routes)}, status=404
            )
        try:
            data = await handler()
        except Exception as e:  # report, never crash the agent for a status read
            log.exception("status route %s failed", request.path)
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500)
        return web.Response(text=json.dumps(data, default=str, sort_keys=True), content_type="application/json")

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.socket_path.parent, 0o700)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            self.socket_path.unlink()
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(self.socket_path))
        await site.start()
        os.chmod(self.socket_path, 0o600)
        log.info("status API on unix:%s", self.socket_path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.socket_path.unlink(missing_ok=True)
