"""The same-node kernel fast path: splice an authorized connection's two sockets.

After the outbound listener has authorized a same-node connection and
connected to the destination pod, :class:`SameNodeSplice` puts both sockets
into the agent's pinned sockhashes (ebpf/sockmap.bpf.c). The kernel then
moves each socket's received bytes straight into the other socket's send
path; Python only watches for the end of the connection. The ztunnel does
not load bcc (that would cost about 130 MB of RSS): it opens the pins with
raw bpf(2) calls (:mod:`node.bpf`).

Order of setup, each step because the one after it depends on it:

1. note each socket's ``tcpi_bytes_acked`` (the SYN may count as one byte),
2. ``splice_peers[cookie] = (peer cookie, 0)`` for both sockets,
3. both into ``splice_targets`` (no program: only a valid redirect target),
4. both into ``splice_socks`` (the verdict runs from now on),
5. poke each socket with SO_RCVLOWAT: bytes that arrived before step 4 sit
   in the receive queue until the next "data ready", which the poke raises,
   so a request sent before the splice is not left waiting for more data.

Half-close, the trap: the verdict never sees a FIN. When one socket reads
EOF, the redirected bytes may still be queued between the sockets, and an
immediate ``shutdown(SHUT_WR)`` of the other socket lost the tail in 4-6 of
10 runs. So the FIN is forwarded only once everything the verdict redirected
from the EOF side is in the other socket's send queue: the redirected count
(``splice_peers``) equals the bytes the peer has had acknowledged since the
splice plus what waits in its send queue (SIOCOUTQ). :func:`drain_decision`
is that test; it is pure and unit tested.

A reset on either side resets the other; cancelling (policy re-check,
drain deadline) resets both. Closing a socket removes it from both
sockhashes; ``splice_peers`` entries are deleted here. Byte counts come from
``splice_peers``, live for ``/config_dump`` and exact in the access log.

Without pins, or when the kernel refuses a sockhash update, the Python
relay carries the connection and the reason is logged once (WARNING).

Which is faster depends on the traffic (perf/bench_splice.py, figures in
perf/README.md): for request/response the splice wins (p50 and p99 below the
Python relay's); for bulk it loses to both relays (the kernel sends each
redirected skb from the psock work queue). So ``--same-node-splice``
chooses: ``always`` splices at once (:meth:`SameNodeSplice.relay`); ``auto``
(:meth:`SameNodeSplice.relay_then_splice`) starts on the relay, promotes an
interactive connection here (:mod:`ztunnel.proxy.promotion`; bytes queued on
a socket when it enters the sockhash are redirected) and hands a bulk one
to the splice(2) relay (:mod:`ztunnel.proxy.pipes`, no pins needed), which
spends about a third less CPU per byte than the Python relay. Splice back to
relay was tried and dropped: the relay stalled once the sockets left the
sockhashes (their write wake-ups did not come back on this kernel). The
sk_msg redirect of Cilium and Merbridge needs the applications' own sockets
in a sockmap, which a node proxy does not own.

After a promotion the relay's counts and the map's are summed, and the
half-close drain starts from each socket's acknowledged bytes plus its send
queue at the splice, so bytes the relay wrote but the peer had not yet
acknowledged are not taken for redirected ones.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import errno
import fcntl
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from node import bpf

from .connections import LiveConnection
from .pipes import pipe_relay
from .promotion import Interactivity, Promotion
from .relay import ByteCounters, RelayResult, relay_sockets, relay_until_handover
from .sockets import size_same_node_buffers

__all__ = [
    "Drain",
    "SameNodeSplice",
    "SpliceMaps",
    "SpliceUnavailable",
    "drain_decision",
    "poll_delay",
]

log = logging.getLogger("veil.ztunnel.proxy")

_SO_COOKIE: Final = 57
_SIOCOUTQ: Final = 0x5411
_TCPI_BYTES_ACKED: Final = 120  # offset of tcpi_bytes_acked in struct tcp_info
_TCP_INFO_LEN: Final = _TCPI_BYTES_ACKED + 8
_TCP_ESTABLISHED: Final = 1  # tcpi_state
_PEER: Final = struct.Struct(bpf.SPLICE_PEER_FORMAT)
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# How often to look for the agent's pins again after they were missing.
_REOPEN_INTERVAL: Final = 5.0
# A half-close whose peer accepts no byte for this long is given up (reset).
_DRAIN_STALL: Final = 120.0
# Bytes left on a spliced socket itself for this long mean the redirect fails.
_STUCK_LIMIT: Final = 1.0
# How often a half-closed side is checked for a reset (its EOF stays readable).
_ERROR_POLL: Final = 0.25


class SpliceUnavailable(Exception):
    """The fast path cannot be used; ``str()`` says why, ``hint`` how to enable it."""

    def __init__(self, why: str, hint: str) -> None:
        super().__init__(why)
        self.hint = hint


class _NotEstablished(Exception):
    """This connection cannot be spliced (already half-closed); the relay takes it."""


class Drain(enum.Enum):
    """What a half-close may do now."""

    WAIT = "wait"  # redirected bytes are still between the sockets
    FORWARD_FIN = "forward_fin"  # all of them are in the peer's send queue


def drain_decision(redirected: int, acked_since_splice: int, send_queue: int) -> Drain:
    """May the EOF of one side become ``shutdown(SHUT_WR)`` of the other yet?

    ``redirected``: bytes the verdict moved from the EOF side to the peer;
    ``acked_since_splice``: the peer's ``tcpi_bytes_acked`` growth since the
    splice (the ztunnel never writes to a spliced socket, so every such byte
    was redirected); ``send_queue``: the peer's SIOCOUTQ. A FIN queued after
    all of these leaves after them.
    """
    if acked_since_splice + send_queue >= redirected:
        return Drain.FORWARD_FIN
    return Drain.WAIT


def poll_delay(attempt: int) -> float:
    """Seconds before the ``attempt``-th drain check: 0.2 ms doubling up to 20 ms."""
    return float(min(0.0002 * (2 ** min(attempt, 10)), 0.02))


@dataclass(eq=False)
class SpliceMaps:
    """The agent's pinned splice maps, opened by fd."""

    socks: int
    targets: int
    peers: int

    @classmethod
    def open(cls, pin_dir: Path) -> SpliceMaps:
        fds: list[int] = []
        try:
            for name in bpf.SPLICE_MAPS:
                fds.append(_open(pin_dir / name))
            prog = _open(pin_dir / f"prog_{bpf.SPLICE_PROGRAM}")
            try:
                used = set(bpf.prog_info(prog).map_ids)
            finally:
                os.close(prog)
            ids = {bpf.map_info(fd).id for fd in fds}
            if not used <= ids:
                raise SpliceUnavailable(
                    f"the splice pins under {pin_dir} do not belong together "
                    "(the agent is replacing them)",
                    "the ztunnel retries shortly; if it persists, restart the agent",
                )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(fds[0], fds[1], fds[2])

    def close(self) -> None:
        for fd in (self.socks, self.targets, self.peers):
            with contextlib.suppress(OSError):
                os.close(fd)

    def redirected(self, cookie: bytes) -> int:
        raw = bpf.map_lookup(self.peers, cookie, _PEER.size)
        return 0 if raw is None else int(_PEER.unpack(raw)[1])


def _open(path: Path) -> int:
    try:
        return bpf.obj_get(str(path))
    except bpf.BpfSyscallError as e:
        if e.errno == errno.ENOENT:
            raise SpliceUnavailable(
                f"no splice pins at {path.parent} ({path.name} is missing)",
                f"run the agent with --pin-dir {path.parent} (it pins the splice there) on a "
                "kernel with sockmap (CONFIG_BPF_STREAM_PARSER)",
            ) from None
        raise SpliceUnavailable(
            f"cannot open {path}: {e.strerror}",
            "the ztunnel needs CAP_BPF (or root) to open the agent's pins",
        ) from None


class SpliceCounters:
    """Live byte counts of a spliced connection: ``base`` (what the relay
    carried before a promotion) plus the redirected counts in ``splice_peers``."""

    __slots__ = ("_base", "_client", "_maps", "_server")
    # Shown in /config_dump: the kernel carries this connection now.
    spliced = True

    def __init__(
        self, maps: SpliceMaps, client: bytes, server: bytes, base: tuple[int, int] = (0, 0)
    ) -> None:
        self._maps = maps
        self._client = client
        self._server = server
        self._base = base

    @property
    def from_client(self) -> int:
        return self._base[0] + self._maps.redirected(self._client)

    @property
    def to_client(self) -> int:
        return self._base[1] + self._maps.redirected(self._server)


class SameNodeSplice:
    """The fast path of one ztunnel: opens the pins lazily, warns once when it cannot."""

    def __init__(
        self, pin_dir: Path | str | None, *, promote: bool = False, bulk_pipe: bool = True
    ) -> None:
        self._pin_dir = None if pin_dir is None else Path(pin_dir)
        # True (auto): relay first, splice once interactive; False: splice at once.
        self.promote = promote
        # auto: a connection that turns bulk moves to the splice(2) relay
        # (ztunnel.proxy.pipes), which needs no pins.
        self.bulk_pipe = bulk_pipe
        self._pipe_warned = False
        self._maps: SpliceMaps | None = None
        self._next_try = 0.0
        self._warned = False

    def close(self) -> None:
        if self._maps is not None:
            self._maps.close()
            self._maps = None

    def maps(self) -> SpliceMaps | None:
        """The open maps, or None (the Python relay carries the connection)."""
        if self._maps is not None or self._pin_dir is None:
            return self._maps
        now = time.monotonic()
        if now < self._next_try:
            return None
        try:
            self._maps = SpliceMaps.open(self._pin_dir)
        except (SpliceUnavailable, OSError) as e:
            self._next_try = now + _REOPEN_INTERVAL
            hint = e.hint if isinstance(e, SpliceUnavailable) else "check bpffs and the agent"
            self._disable(str(e), hint)
            return None
        log.info("same-node kernel splice on (pins %s)", self._pin_dir)
        return self._maps

    def _disable(self, why: str, hint: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "same-node fast path off, using the Python relay: %s; to enable: %s", why, hint
            )

    async def relay_then_splice(
        self, client: socket.socket, server: socket.socket, conn: LiveConnection
    ) -> RelayResult:
        """``auto``: relay, and splice once the connection behaves interactively.

        Owns both sockets. Bulk connections move to the splice(2) relay
        (``bulk_pipe``), or stay on the relay to their end.
        """
        counters = conn.track_bytes()
        maps = self.maps()
        if maps is None and not self.bulk_pipe:
            # No pins (warned once): nothing to promote to.
            return await relay_sockets(client, server, counters)
        if self.bulk_pipe:
            size_same_node_buffers(client, server)
        watch = Interactivity(promote=maps is not None, pipe=self.bulk_pipe)
        handed = await relay_until_handover(client, server, counters, watch)
        if isinstance(handed, RelayResult):
            return handed
        c, s = handed.client, handed.server
        if handed.kind is Promotion.BULK:
            return await self._bulk(c, s, conn, counters)
        log.debug("same-node connection %d promoted to the kernel splice", conn.id)
        base = (counters.from_client, counters.to_client)
        try:
            spliced = await self.relay(c, s, conn, base=base)
        except BaseException:
            for sock in (c, s):
                _reset(sock)
            raise
        if spliced is not None:
            return spliced
        # Not spliced (a FIN arrived meanwhile, or the pins went): no byte
        # moved, so the relay carries on where it stopped.
        conn.counters = counters
        return await relay_sockets(c, s, counters)

    async def _bulk(
        self, c: socket.socket, s: socket.socket, conn: LiveConnection, counters: ByteCounters
    ) -> RelayResult:
        """A bulk connection, drained out of the relay, goes on through pipes
        (pipe_relay resets both sockets itself if it fails or is cancelled)."""
        log.debug("same-node connection %d moved to the splice(2) relay", conn.id)
        if (result := await pipe_relay(c, s, counters)) is not None:
            return result
        if not self._pipe_warned:
            self._pipe_warned = True
            log.warning(
                "no pipes for the splice(2) relay (out of file descriptors?), bulk stays on "
                "the Python relay: raise the ztunnel's open-files limit (LimitNOFILE)"
            )
        return await relay_sockets(c, s, counters)

    async def relay(
        self,
        client: socket.socket,
        server: socket.socket,
        conn: LiveConnection,
        *,
        base: tuple[int, int] = (0, 0),
    ) -> RelayResult | None:
        """Splice and carry the connection to its end; None when the Python relay must.

        Owns both sockets once it returns a result (or raises); on None they
        are untouched and no byte has moved. ``base``: bytes (from, to the
        client) the relay carried before a promotion, added to every count.
        """
        maps = self.maps()
        if maps is None:
            return None
        try:
            pair = _Pair.start(maps, client, server)
        except _NotEstablished:
            return None
        except SpliceUnavailable as e:
            self._disable(str(e), e.hint)
            return None
        except OSError:
            # Half spliced: bytes may have moved, so no relay can take over.
            for sock in (client, server):
                _reset(sock)
            raise
        conn.counters = SpliceCounters(maps, pair.cookies[0], pair.cookies[1], base)
        try:
            result = await pair.run()
            return RelayResult(
                base[0] + result.from_client, base[1] + result.to_client, result.error
            )
        except BaseException:
            pair.reset()
            raise
        finally:
            # Freeze the counts before the entries go: the access log reads them after.
            final = ByteCounters()
            final.from_client, final.to_client = base
            with contextlib.suppress(OSError):
                final.from_client += maps.redirected(pair.cookies[0])
                final.to_client += maps.redirected(pair.cookies[1])
            conn.counters = final
            pair.release()


class _Pair:
    """The two spliced sockets of one connection (index 0: client, 1: server)."""

    def __init__(self, maps: SpliceMaps, socks: tuple[socket.socket, socket.socket]) -> None:
        self.maps = maps
        self.socks = socks
        self.cookies = (_cookie(socks[0]), _cookie(socks[1]))
        # Everything written before the splice (by a relay before a promotion)
        # is acknowledged or still queued; only bytes beyond it were redirected.
        self.base = (
            _bytes_acked(socks[0]) + _send_queue(socks[0]),
            _bytes_acked(socks[1]) + _send_queue(socks[1]),
        )
        self.eof = [False, False]
        self.shut = [False, False]  # FIN forwarded to this socket
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._readers = [False, False]
        self._stuck_since: list[float | None] = [None, None]
        self._drains: list[asyncio.Task[None]] = []

    @classmethod
    def start(cls, maps: SpliceMaps, client: socket.socket, server: socket.socket) -> _Pair:
        try:
            pair = cls(maps, (client, server))
        except OSError as e:
            raise SpliceUnavailable(f"cannot read socket state: {e}", "none needed") from None
        if not all(_established(x) for x in pair.socks):
            # A sockhash takes only established sockets: a client that sent its
            # FIN before the splice is relayed (the kernel would refuse it).
            raise _NotEstablished
        c, s = pair.cookies
        fds = [struct.pack("i", client.fileno()), struct.pack("i", server.fileno())]
        step = "splice_peers"
        try:
            bpf.map_update(maps.peers, c, _PEER.pack(int.from_bytes(s, "little"), 0))
            bpf.map_update(maps.peers, s, _PEER.pack(int.from_bytes(c, "little"), 0))
            step = "splice_targets"
            bpf.map_update(maps.targets, c, fds[0])
            bpf.map_update(maps.targets, s, fds[1])
            step = "splice_socks"
            bpf.map_update(maps.socks, c, fds[0])
        except bpf.BpfSyscallError as e:
            # No verdict has run on either socket yet: undo and let Python relay.
            pair.release()
            if e.errno == errno.EOPNOTSUPP and not all(_established(x) for x in pair.socks):
                raise _NotEstablished from None
            raise SpliceUnavailable(
                f"the kernel refused a {step} update ({e.strerror})",
                "a full map (more than "
                f"{bpf.SPLICE_MAX // 2} spliced connections) or a kernel without sockmap",
            ) from None
        try:
            bpf.map_update(maps.socks, s, fds[1])
        except bpf.BpfSyscallError as e:
            # The client socket's bytes may already have moved: too late to fall back.
            pair.release()
            raise OSError(e.errno, f"splicing the server socket failed: {e.strerror}") from None
        for sock in pair.socks:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return pair

    async def run(self) -> RelayResult:
        """Watch the splice to its end: EOFs, resets, cancellation."""
        loop = asyncio.get_running_loop()
        for i, sock in enumerate(self.socks):
            loop.add_reader(sock.fileno(), self._readable, i)
            self._readers[i] = True
        try:
            await asyncio.shield(self.done)
        finally:
            self._stop_readers()
            for task in self._drains:
                task.cancel()
        if self.error is not None:
            self.reset()
        else:
            for sock in self.socks:
                sock.close()
        return RelayResult(
            self.maps.redirected(self.cookies[0]), self.maps.redirected(self.cookies[1]), self.error
        )

    def _readable(self, i: int) -> None:
        sock = self.socks[i]
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._stuck_since[i] = None
            return
        except OSError as e:
            self._fail(f"{_side(i)}: {e}")
            return
        loop = asyncio.get_running_loop()
        self._pause_reader(i)
        if data:
            # Bytes on the spliced socket itself: not yet through the verdict
            # (gone within microseconds), or the redirect fails because the
            # peer is gone. Look again shortly instead of spinning; give up
            # when they stay.
            now = time.monotonic()
            since = self._stuck_since[i]
            if since is None:
                self._stuck_since[i] = now
            elif now - since > _STUCK_LIMIT:
                self._fail(f"{_side(1 - i)}: gone while bytes were still arriving")
                return
            loop.call_later(0.001, self._resume_reader, i)
            return
        self.eof[i] = True
        self._drains.append(loop.create_task(self._forward_fin(i)))

    def _resume_reader(self, i: int) -> None:
        if not self.done.done() and not self._readers[i] and self.socks[i].fileno() >= 0:
            asyncio.get_running_loop().add_reader(self.socks[i].fileno(), self._readable, i)
            self._readers[i] = True

    async def _forward_fin(self, i: int) -> None:
        """Socket ``i`` read EOF: shut the other one down once the bytes have left,
        then watch socket ``i`` for a reset (its reader is off: EOF stays readable)."""
        peer = 1 - i
        attempt = 0
        last = -1
        stalled_since = time.monotonic()
        while True:
            try:
                acked = _bytes_acked(self.socks[peer]) - self.base[peer]
                queued = _send_queue(self.socks[peer])
            except OSError as e:
                self._fail(f"{_side(peer)}: {e}")
                return
            redirected = self.maps.redirected(self.cookies[i])
            if drain_decision(redirected, acked, queued) is Drain.FORWARD_FIN:
                break
            now = time.monotonic()
            if acked != last:
                last, stalled_since = acked, now
            elif now - stalled_since > _DRAIN_STALL:
                self._fail(f"{_side(peer)}: accepted no byte for {_DRAIN_STALL:.0f}s after EOF")
                return
            await asyncio.sleep(poll_delay(attempt))
            attempt += 1
        try:
            self.socks[peer].shutdown(socket.SHUT_WR)
        except OSError as e:
            self._fail(f"{_side(peer)}: {e}")
            return
        self.shut[peer] = True
        if all(self.shut):
            if not self.done.done():
                self.done.set_result(None)
            return
        while not self.done.done():
            await asyncio.sleep(_ERROR_POLL)
            err = _socket_error(self.socks[i])
            if err:
                self._fail(f"{_side(i)}: {os.strerror(err)}")
                return

    def _fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
        if not self.done.done():
            self.done.set_result(None)

    def _pause_reader(self, i: int) -> None:
        if self._readers[i]:
            asyncio.get_running_loop().remove_reader(self.socks[i].fileno())
            self._readers[i] = False

    def _stop_readers(self) -> None:
        for i in (0, 1):
            if self.socks[i].fileno() >= 0:
                self._pause_reader(i)

    def reset(self) -> None:
        """Abort both sockets with a RST (closing also drops them from the sockhashes)."""
        self._stop_readers()
        for sock in self.socks:
            _reset(sock)

    def release(self) -> None:
        """Forget the connection in the maps (the sockhashes forget closed sockets)."""
        for cookie in self.cookies:
            with contextlib.suppress(OSError):
                bpf.map_delete(self.maps.peers, cookie)
            for fd in (self.maps.socks, self.maps.targets):
                with contextlib.suppress(OSError):
                    bpf.map_delete(fd, cookie)


def _reset(sock: socket.socket) -> None:
    if sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.close()


def _side(i: int) -> str:
    return "client" if i == 0 else "server"


def _cookie(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8)


def _bytes_acked(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(raw) < _TCP_INFO_LEN:
        raise OSError(errno.EOPNOTSUPP, "tcp_info has no tcpi_bytes_acked (kernel before 4.1)")
    return int(struct.unpack_from("=Q", raw, _TCPI_BYTES_ACKED)[0])


def _established(sock: socket.socket) -> bool:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except OSError:
        return False
    return info[:1] == bytes([_TCP_ESTABLISHED])


def _send_queue(sock: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), _SIOCOUTQ, buf)
    return int(buf[0])


def _socket_error(sock: socket.socket) -> int:
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    except OSError as e:
        return e.errno or errno.EIO
