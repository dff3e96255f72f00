"""Serves the agent's status routes on a unix socket with aiohttp.

Three kinds of route: GET documents, POST changes (a JSON body in, a JSON
document out; used for runtime log levels) and streams (JSON lines until the
client goes away; used by ``veilctl monitor``). A handler that fails answers
HTTP 500 with the error; it never takes the agent down.

The socket lives at a well-known host path that the old and the new agent
of a DaemonSet surge share. Starting never refuses and never leaves a gap:
the new agent binds beside the path and renames its socket over it
(:func:`node.unix_socket.bind_over`), logging which agent it took over from.
The old agent keeps answering the connections it already accepted, notices
that the path is no longer its socket (:attr:`StatusServer.taken_over`; the
daemon then stops changing the data plane) and at exit removes the path only
if it is still its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from node.unix_socket import SocketClaim, bind_over, socket_owner_pid
from veil.errors import VeilError

__all__ = ["StatusServer"]

log = logging.getLogger("veil.agent.status")

Handler = Callable[[], Awaitable[Any]]
PostHandler = Callable[[Mapping[str, Any]], Awaitable[Any]]
StreamHandler = Callable[[Mapping[str, str]], AsyncIterator[Mapping[str, Any]]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=str, sort_keys=True),
        status=status,
        content_type="application/json",
    )


class StatusServer:
    """Maps paths to coroutines returning JSON-serialisable data."""

    def __init__(self, socket_path: pathlib.Path) -> None:
        self.socket_path = socket_path
        self._routes: dict[str, Handler] = {}
        self._posts: dict[str, PostHandler] = {}
        self._streams: dict[str, StreamHandler] = {}
        self._runner: web.AppRunner | None = None
        self._streaming: set[asyncio.Task[Any]] = set()
        self._claim: SocketClaim | None = None
        # The pid whose socket this one replaced at start (None: nothing answered).
        self.took_over_from: int | None = None

    def route(self, path: str, handler: Handler) -> None:
        self._routes[path] = handler

    def route_post(self, path: str, handler: PostHandler) -> None:
        self._posts[path] = handler

    def route_stream(self, path: str, handler: StreamHandler) -> None:
        self._streams[path] = handler

    def _paths(self) -> list[str]:
        return sorted({*self._routes, *self._posts, *self._streams})

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return await self._post(request)
        stream = self._streams.get(request.path)
        if stream is not None:
            return await self._stream(request, stream)
        handler = self._routes.get(request.path)
        if handler is None:
            return _json({"error": f"unknown path {request.path}", "paths": self._paths()}, 404)
        try:
            data = await handler()
        except Exception as e:  # report, never crash the agent for a status read
            log.exception("status route %s failed", request.path)
            return _json({"error": f"{type(e).__name__}: {e}"}, 500)
        return _json(data)

    async def _post(self, request: web.Request) -> web.Response:
        handler = self._posts.get(request.path)
        if handler is None:
            return _json({"error": f"no POST on {request.path}", "paths": sorted(self._posts)}, 404)
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return _json({"error": "the request body is not JSON"}, 400)
        if not isinstance(body, dict):
            return _json({"error": "the request body must be a JSON object"}, 400)
        try:
            data = await handler(body)
        except VeilError as e:  # the caller's mistake: say what and how to fix it
            return _json({"error": e.message, "hint": e.hint}, 400)
        except Exception as e:
            log.exception("status route POST %s failed", request.path)
            return _json({"error": f"{type(e).__name__}: {e}"}, 500)
        return _json(data)

    async def _stream(self, request: web.Request, handler: StreamHandler) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        task = asyncio.current_task()
        if task is not None:
            self._streaming.add(task)
        try:
            async for event in handler(request.query):
                await resp.write(json.dumps(event, default=str, sort_keys=True).encode() + b"\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away: that ends a stream
        except Exception as e:
            log.exception("status stream %s failed", request.path)
            err = {"type": "error", "error": f"{type(e).__name__}: {e}"}
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write(json.dumps(err).encode() + b"\n")
        finally:
            self._streaming.discard(task)  # type: ignore[arg-type]
        return resp

    @property
    def taken_over(self) -> bool:
        """True once another agent has put its socket at our path."""
        return self._claim is not None and not self._claim.held()

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.socket_path.parent, 0o700)
        previous = await asyncio.to_thread(socket_owner_pid, self.socket_path)
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._dispatch)
        app.router.add_route("POST", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock, self._claim = bind_over(self.socket_path, mode=0o600)
        site = web.SockSite(self._runner, sock)
        await site.start()
        if previous is not None:
            self.took_over_from = previous
            log.warning(
                "took over the status socket %s from the agent running as pid %d (a rolling "
                "update); that agent stops changing the data plane and keeps only the "
                "connections it already accepted",
                self.socket_path,
                previous,
            )
        log.info("status API on unix:%s", self.socket_path)

    async def stop(self) -> None:
        # Streams never end by themselves; cleanup would wait a minute for them.
        for task in list(self._streaming):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._claim is not None:
            # Only our own socket: after a takeover the path is the new agent's.
            if not self._claim.release():
                log.info(
                    "status socket %s belongs to a newer agent; left in place", self.socket_path
                )
            self._claim = None
