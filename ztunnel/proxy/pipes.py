"""The splice(2) relay: same-node bulk bytes moved socket -> pipe -> socket in the kernel.

Both sockets of a same-node connection are plain TCP inside the node (the
one accepted from pod A on 15001, the one connected to pod B), so the kernel
can move their bytes without a copy through Python: per direction, one pipe;
``splice(socket -> pipe)`` takes references to the received pages and
``splice(pipe -> socket)`` hands them to the other socket's send path. The
Python cost is two syscalls per up to :data:`PIPE_SIZE` bytes, against a
receive copy and a send copy of every byte in the relay
(:mod:`ztunnel.proxy.relay`). ``auto`` hands a connection here once it
turns out bulk (:mod:`ztunnel.proxy.promotion`); perf/README.md has the
figures that decided it.

Per direction (:class:`_Flow`), driven by the event loop on the raw fds:

* the source is read (``add_reader``) while its pipe has room; a full pipe
  stops reading, which is the backpressure: the sender's window closes;
* what was read is pushed on at once; when the destination's send buffer is
  full (EAGAIN) ``add_writer`` waits for room;
* EOF (splice returns 0): the pipe is drained into the destination first,
  then the destination is shut down for writing, so no byte is lost and the
  FIN comes after the last one;
* a reset or any other error on either socket resets both (SO_LINGER 0), so
  neither end mistakes an aborted stream for a complete one; so does
  cancelling the relay (a policy change, a drain deadline). Besides the
  errors splice returns, SO_ERROR is checked every :data:`_ERROR_POLL`
  seconds (see there why).

Counts are what splice moved INTO the destination, so they are exact, live
(:class:`~ztunnel.proxy.relay.ByteCounters`) and final. The pipes are closed
on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from typing import Final

from .relay import ByteCounters, RelayResult

__all__ = ["PIPE_SIZE", "open_pipe", "pipe_capacity", "pipe_relay"]

# The most bytes in flight per direction: large enough that one pair of
# syscalls moves a loopback burst, and what /proc/sys/fs/pipe-max-size allows
# by default. A pipe's pages are only referenced while bytes sit in it.
PIPE_SIZE: Final = 1024 * 1024
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: Final = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# How often both sockets are checked for a pending error (a RST). Needed
# because uvloop (libuv) treats EPOLLERR on a watched fd as fatal for the
# watch: the callback never runs, so a reset would otherwise go unnoticed,
# as it would while a full pipe has stopped reading the reset side.
_ERROR_POLL: Final = 0.05


def pipe_capacity(requested: int, set_size: int | None, default: int) -> int:
    """The capacity a pipe ends up with: what F_SETPIPE_SZ granted, else the
    default (an unprivileged process above pipe-max-size, or a kernel that
    refused), never more than was asked for."""
    granted = set_size if set_size is not None and set_size > 0 else default
    return max(1, min(granted, requested)) if requested > 0 else max(1, granted)


def open_pipe(size: int = PIPE_SIZE) -> tuple[int, int, int]:
    """A non-blocking pipe ``(read fd, write fd, capacity)`` of up to ``size`` bytes."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            granted: int | None = fcntl.fcntl(w, _F_SETPIPE_SZ, size)
        except OSError:
            granted = None  # EPERM above pipe-max-size: the default size still works
        default = fcntl.fcntl(w, _F_GETPIPE_SZ)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w, pipe_capacity(size, granted, default)


class _Flow:
    """One direction: ``src`` -> pipe -> ``dst``. ``from_client`` names it."""

    __slots__ = (
        "cap",
        "dst",
        "eof",
        "from_client",
        "inpipe",
        "moved",
        "reading",
        "relay",
        "rfd",
        "shut",
        "src",
        "wfd",
        "writing",
    )

    def __init__(
        self, relay: _PipeRelay, src: socket.socket, dst: socket.socket, from_client: bool
    ) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.from_client = from_client
        self.rfd = self.wfd = -1
        self.cap = 0
        self.inpipe = 0  # bytes read into the pipe, not yet in dst
        self.moved = 0  # bytes spliced into dst
        self.eof = False
        self.shut = False  # dst shut down for writing (the FIN forwarded)
        self.reading = False
        self.writing = False

    def open(self) -> None:
        self.rfd, self.wfd, self.cap = open_pipe()

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.rfd = self.wfd = -1

    def src_side(self) -> str:
        return "client" if self.from_client else "server"

    def dst_side(self) -> str:
        return "server" if self.from_client else "client"

    def start_reading(self) -> None:
        if not self.reading and not self.eof and self.relay.live:
            self.relay.loop.add_reader(self.src.fileno(), self.readable)
            self.reading = True

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            if self.src.fileno() >= 0:
                self.relay.loop.remove_reader(self.src.fileno())

    def stop_writing(self) -> None:
        if self.writing:
            self.writing = False
            if self.dst.fileno() >= 0:
                self.relay.loop.remove_writer(self.dst.fileno())

    def readable(self) -> None:
        room = self.cap - self.inpipe
        if room <= 0:
            self.stop_reading()
            return
        try:
            n = os.splice(self.src.fileno(), self.wfd, room, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            if self.inpipe > 0:
                # The pipe has byte room but no free slot (each slot holds one
                # segment's pages; many small segments fill the slots first):
                # read again once dst has taken some, instead of spinning.
                self.stop_reading()
                self.flush()
            return  # otherwise a spurious wake-up
        except OSError as e:
            self.relay.fail(f"{self.src_side()}: {e}")
            return
        if n == 0:
            self.eof = True
            self.stop_reading()
        else:
            self.inpipe += n
        self.flush()
        if self.inpipe >= self.cap:
            self.stop_reading()  # the pipe is full: resume once dst takes bytes

    def flush(self) -> None:
        """Pushes the pipe into dst; forwards the FIN once an EOF's pipe is empty."""
        while self.inpipe > 0:
            try:
                n = os.splice(self.rfd, self.dst.fileno(), self.inpipe, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                if not self.writing and self.relay.live:
                    self.relay.loop.add_writer(self.dst.fileno(), self.flush)
                    self.writing = True
                return
            except OSError as e:
                self.relay.fail(f"{self.dst_side()}: {e}")
                return
            if n <= 0:  # the pipe claims bytes it does not have: never expected
                self.relay.fail(f"{self.dst_side()}: splice moved no byte from a full pipe")
                return
            self.inpipe -= n
            self.moved += n
            counters = self.relay.counters
            if self.from_client:
                counters.from_client += n
            else:
                counters.to_client += n
        self.stop_writing()
        if self.eof:
            if not self.shut:
                self.shut = True
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError as e:
                    self.relay.fail(f"{self.dst_side()}: {e}")
                    return
                self.relay.direction_done()
        else:
            self.start_reading()


class _PipeRelay:
    def __init__(
        self, client: socket.socket, server: socket.socket, counters: ByteCounters
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.socks = (client, server)
        self.counters = counters
        self.error: str | None = None
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.flows = (_Flow(self, client, server, True), _Flow(self, server, client, False))
        self._timer: asyncio.TimerHandle | None = None

    def watch_errors(self) -> None:
        """Fails the relay when either socket has a pending error; re-arms itself."""
        self._timer = None
        if not self.live:
            return
        for sock, side in zip(self.socks, ("client", "server"), strict=True):
            try:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as e:
                err = e.errno or 5
            if err:
                self.fail(f"{side}: [Errno {err}] {os.strerror(err)}")
                return
        self._timer = self.loop.call_later(_ERROR_POLL, self.watch_errors)

    @property
    def live(self) -> bool:
        return not self.done.done()

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
        self.stop()  # no more callbacks: both sockets are reset next
        if not self.done.done():
            self.done.set_result(None)

    def direction_done(self) -> None:
        if all(f.shut for f in self.flows) and not self.done.done():
            self.done.set_result(None)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for flow in self.flows:
            flow.stop_reading()
            flow.stop_writing()

    def close(self, *, reset: bool) -> None:
        self.stop()
        for flow in self.flows:
            flow.close()
        for sock in self.socks:
            if reset and sock.fileno() >= 0:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()


async def pipe_relay(
    client: socket.socket, server: socket.socket, counters: ByteCounters | None = None
) -> RelayResult | None:
    """Relays two connected non-blocking sockets through pipes until both directions end.

    Takes ownership of both sockets (closed, or reset after an error, on
    return) unless it returns None: the pipes could not be made (no fds
    left), no byte has moved and the caller relays in Python instead.
    ``counters`` is updated live with the bytes delivered to each side. If
    the calling task is cancelled, both connections are reset and the
    cancellation propagates.
    """
    relay = _PipeRelay(client, server, counters if counters is not None else ByteCounters())
    try:
        for flow in relay.flows:
            flow.open()
    except OSError:
        for flow in relay.flows:
            flow.close()
        return None
    try:
        for flow in relay.flows:
            flow.start_reading()
        relay.watch_errors()
        await asyncio.shield(relay.done)
    except BaseException:
        relay.close(reset=True)
        raise
    relay.close(reset=relay.error is not None)
    c = relay.counters
    return RelayResult(c.from_client, c.to_client, relay.error)
