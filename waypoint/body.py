"""A request body that streams: the front end queues it, the proxy reads it.

The waypoint decides on a request's head and relays its body as it arrives,
so an upload of any size, or a gRPC stream that never ends, passes through
in bounded memory. The HTTP/1.1 front end fills a :class:`RequestBody` on
demand (``fill`` reads the connection once and feeds the parser, which
pushes what it parsed); the HTTP/2 front end pushes DATA as it comes and is
told, through ``consumed``, when to give the client its flow-control window
back. Either way :meth:`RequestBody.read` returns the next piece, ``b""`` at
the end, and raises the error that ended the body early.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["RequestBody", "RequestError"]


class RequestError(Exception):
    """The request cannot be served as sent: answer ``status`` (if nothing was
    answered yet) and close the connection or stream."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class RequestBody:
    """A request body as it arrives. ``length`` is the declared length
    (``Content-Length``), None when the body is framed otherwise (chunked,
    HTTP/2 DATA without a length)."""

    __slots__ = (
        "_chunks",
        "_error",
        "_fill",
        "_waiter",
        "complete",
        "consumed",
        "length",
        "max_size",
        "on_first_read",
        "received",
    )

    def __init__(
        self,
        length: int | None,
        *,
        fill: Callable[[], Awaitable[None]] | None = None,
        max_size: int = 0,
    ) -> None:
        self.length = length
        self._fill = fill
        self.max_size = max_size  # 0: no limit
        self._chunks: deque[bytes] = deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.complete = length == 0
        self.received = 0
        # Called with the byte count each time the proxy takes bytes (HTTP/2
        # acknowledges them); called once before the first read that has to
        # wait for the client (HTTP/1.1 sends "100 Continue").
        self.consumed: Callable[[int], None] | None = None
        self.on_first_read: Callable[[], None] | None = None

    @classmethod
    def empty(cls) -> RequestBody:
        return cls(0)

    # -- the front end ------------------------------------------------------------

    def push(self, data: bytes) -> None:
        if not data or self.complete or self._error is not None:
            return
        self.received += len(data)
        if self.max_size and self.received > self.max_size:
            self.fail(RequestError(413, f"the request body is larger than {self.max_size} bytes"))
            return
        self._chunks.append(data)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._error is None and not (self.complete and not self._chunks):
            self._error = exc
            self._chunks.clear()
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- the proxy ----------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Everything was read (or the body failed)."""
        return self._error is not None or (self.complete and not self._chunks)

    def take_ready(self) -> bytes:
        """Whatever arrived and was not read yet, without waiting (may be ``b""``)."""
        if self._error is not None:
            raise self._error
        if not self._chunks:
            return b""
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._took(len(data))
        return data

    async def read(self) -> bytes:
        """The next piece; ``b""`` once the body ended."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            if self.on_first_read is not None:
                hook, self.on_first_read = self.on_first_read, None
                hook()
            if self._fill is not None:
                await self._fill()
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        if self._error is not None:
            raise self._error
        data = self._chunks.popleft()
        self._took(len(data))
        return data

    def discard(self) -> None:
        """Drops what arrived unread (the stream ended without reading it),
        counting it as consumed so HTTP/2 gives the client its window back."""
        n = sum(map(len, self._chunks))
        self._chunks.clear()
        self._took(n)

    def _took(self, n: int) -> None:
        if self.consumed is not None and n:
            self.consumed(n)
