"""The accept loop shared by the 15001, 15006 and 15008 listeners.

A :class:`Listener` owns one listening socket and one task per accepted
connection. Accepting drains the kernel's queue with non-blocking ``accept()``
calls after each wake-up, so a burst of new connections costs one trip
through the event loop rather than one per connection. ``stop_accepting``
closes the socket (new SYNs then find no listener and, under the node's
steering, are dropped: fail closed) while accepted connections carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["ConnectionHandler", "Listener"]

log = logging.getLogger("veil.ztunnel.proxy")

# Returns the coroutine that serves the connection, or None when the handler
# already dealt with it synchronously (a refusal needs no task).
ConnectionHandler = Callable[[socket.socket], Coroutine[Any, Any, None] | None]
# Accepted per wake-up before yielding to the loop, so one busy listener does
# not starve the others.
_ACCEPT_BATCH = 128


class Listener:
    """Accepts on ``sock`` and runs what ``handler(conn)`` returns in a task per
    connection (nothing when it returns None: it dealt with the socket at once).

    ``handler`` owns the accepted socket (closes or resets it).
    """

    def __init__(self, name: str, sock: socket.socket, handler: ConnectionHandler) -> None:
        self.name = name
        self.sock = sock
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving: asyncio.Task[None] | None = None
        self.accepted = 0

    @property
    def open(self) -> bool:
        return self.sock.fileno() >= 0

    def start(self) -> None:
        """Starts accepting in a background task."""
        if self._serving is None:
            self._serving = asyncio.get_running_loop().create_task(
                self._serve(), name=f"veil-listener:{self.name}"
            )

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sock
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                if sock.fileno() < 0:
                    return  # stop_accepting closed it
                log.warning("%s listener: accept failed: %s", self.name, e)
                await asyncio.sleep(0.1)  # EMFILE and friends: do not spin
                continue
            self._spawn(conn)
            for _ in range(_ACCEPT_BATCH):
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    log.warning("%s listener: accept failed: %s", self.name, e)
                    break
                self._spawn(conn)

    def _spawn(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        # Every relay writes what it read at once; Nagle would hold a small
        # reply until the peer's delayed ACK (tens of milliseconds) whenever an
        # earlier segment is still unacknowledged. Accepted sockets do not
        # inherit it from the listener, so it is set on each one.
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted += 1
        # The handler owns ``conn`` (it may already belong to a transport when
        # something fails, so nothing here closes it). No wrapper coroutine:
        # with 10,000 live connections every frame per connection counts.
        try:
            serving = self._handler(conn)
        except Exception:
            # A synchronous routing failure must not end the accept loop.
            log.exception("%s listener: connection handler failed", self.name)
            with contextlib.suppress(OSError):
                conn.close()
            return
        if serving is None:
            return
        task = asyncio.get_running_loop().create_task(serving)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s listener: connection handler failed", self.name, exc_info=exc)

    def stop_accepting(self) -> None:
        """Closes the listening socket; accepted connections are not touched."""
        if self._serving is not None:
            self._serving.cancel()
            self._serving = None
        # shutdown() stops the kernel listening now: close() alone is deferred
        # while the event loop still watches the socket (until the cancelled
        # accept is cleaned up), and meanwhile new connections would still
        # land in this backlog instead of a surge or sibling listener's.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    @property
    def active(self) -> int:
        """Connection handlers still running (including handshakes not yet registered)."""
        return len(self._tasks)

    async def close(self, timeout: float = 5.0) -> None:
        """Stops accepting and cancels every handler still running."""
        self.stop_accepting()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
