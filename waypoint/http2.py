"""HTTP/2 with prior knowledge inside a tunnel (the h2 library), one task per stream.

Each stream is handed to :class:`~waypoint.forward.RequestProxy` as soon as
its headers arrive; its DATA streams in as a
:class:`~waypoint.body.RequestBody` whose flow-control window goes back to
the client as the proxy reads it (so a fast client cannot fill the
waypoint's memory, and a gRPC stream can run both ways at once). Its
response goes out honouring the peer's flow-control windows. A protocol
error from the client ends the connection with GOAWAY; nothing the client
sends raises out of :func:`serve_http2`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from .body import RequestBody, RequestError
from .forward import RequestProxy, TunnelContext
from .upstream import UpstreamError

__all__ = ["PREFACE", "serve_http2"]

log = logging.getLogger("veil.waypoint.http2")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_READ = 64 * 1024


class _Stream:
    def __init__(self, headers: list[tuple[bytes, bytes]], body: RequestBody) -> None:
        self.headers = headers
        self.body = body
        self.window = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class _Session:
    def __init__(
        self, writer: asyncio.StreamWriter, proxy: RequestProxy, ctx: TunnelContext
    ) -> None:
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.writer = writer
        self.proxy = proxy
        self.ctx = ctx
        self.streams: dict[int, _Stream] = {}

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def handle(self, events: Sequence[h2.events.Event]) -> None:
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self._start(ev)
            elif isinstance(ev, h2.events.DataReceived):
                st = self.streams.get(ev.stream_id)
                if st is None or st.body.done:
                    if ev.flow_controlled_length:
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                else:
                    # Padding is flow controlled but never read: give it back now;
                    # the data's window returns as the proxy reads it.
                    pad = (ev.flow_controlled_length or 0) - len(ev.data or b"")
                    if pad > 0:
                        self.conn.acknowledge_received_data(pad, ev.stream_id)
                    st.body.push(bytes(ev.data or b""))
            elif isinstance(ev, h2.events.StreamEnded):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.body.finish()
            elif isinstance(ev, h2.events.StreamReset):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None:
                    st.body.fail(ConnectionResetError("the client reset the stream"))
                    if st.task is not None:
                        st.task.cancel()
            elif isinstance(ev, h2.events.WindowUpdated):
                targets = (
                    self.streams.values()
                    if ev.stream_id == 0
                    else filter(None, [self.streams.get(ev.stream_id)])
                )
                for s in targets:
                    s.window.set()
        self.flush()

    def _start(self, ev: h2.events.RequestReceived) -> None:
        """A request is served from its head on; its body streams in."""
        sid = ev.stream_id
        raw = [(bytes(n), bytes(v)) for n, v in ev.headers or []]
        declared = next((v for n, v in raw if n == b"content-length"), None)
        length = 0 if ev.stream_ended is not None else None
        if length is None and declared is not None and declared.isdigit():
            length = int(declared)
        body = RequestBody(length, max_size=self.proxy.max_body)
        if length == 0:
            body.finish()

        def consumed(n: int, sid: int = sid) -> None:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.acknowledge_received_data(n, sid)
                self.flush()

        body.consumed = consumed
        st = _Stream(raw, body)
        self.streams[sid] = st
        st.task = asyncio.get_running_loop().create_task(self._serve(sid, st))

    async def _serve(self, sid: int, st: _Stream) -> None:
        pseudo = {
            n.decode("latin-1"): v.decode("latin-1") for n, v in st.headers if n.startswith(b":")
        }
        regular = [(n, v) for n, v in st.headers if not n.startswith(b":")]
        sink = _Sink(self, sid, st)
        try:
            method = pseudo.get(":method", "")
            target = pseudo.get(":path", "")
            host = pseudo.get(":authority") or next(
                (v.decode("latin-1") for n, v in regular if n == b"host"), ""
            )
            if method == "CONNECT" or not target:
                await sink.simple(405 if method == "CONNECT" else 400, b"bad request\n")
            else:
                await self.proxy.serve(
                    self.ctx, method, target, host, regular, st.body, "http/2", sink
                )
            if not st.body.done:
                # Answered before the body ended (refused, or an early answer):
                # tell the client to stop sending (RFC 9113, 8.1).
                with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                    self.conn.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
                    self.flush()
        except RequestError as e:
            if not sink.started:
                with contextlib.suppress(h2.exceptions.ProtocolError, ConnectionError):
                    await sink.simple(e.status, f"{e.detail}\n".encode())
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                self.flush()
        except (
            h2.exceptions.ProtocolError,
            h2.exceptions.StreamClosedError,
            ConnectionError,
            UpstreamError,
        ):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.reset_stream(sid)
                self.flush()
        finally:
            self.streams.pop(sid, None)
            st.body.discard()  # unread DATA still holds connection window


class _Sink:
    def __init__(self, session: _Session, sid: int, st: _Stream) -> None:
        self._s = session
        self._sid = sid
        self._st = st
        self.started = False

    def upgrade_protocol(self) -> bytes | None:
        return None  # HTTP/2 has no Upgrade (RFC 9113, 8.6)

    async def switch(
        self, headers: Sequence[tuple[bytes, bytes]]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        raise RuntimeError("an HTTP/2 stream cannot switch protocols")

    async def start(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.started = True
        out = [(b":status", str(status).encode())] + [(n.lower(), v) for n, v in headers]
        self._s.conn.send_headers(self._sid, out)
        self._s.flush()

    async def data(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        conn = self._s.conn
        while view:
            window = min(conn.local_flow_control_window(self._sid), conn.max_outbound_frame_size)
            if window <= 0:
                self._st.window.clear()
                await self._st.window.wait()
                continue
            conn.send_data(self._sid, bytes(view[:window]))
            view = view[window:]
            self._s.flush()
            await self._s.writer.drain()

    async def end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        if trailers:
            self._s.conn.send_headers(
                self._sid, [(n.lower(), v) for n, v in trailers], end_stream=True
            )
        else:
            self._s.conn.end_stream(self._sid)
        self._s.flush()
        await self._s.writer.drain()

    async def simple(self, status: int, body: bytes) -> None:
        await self.start(
            status, [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        )
        await self.data(body)
        await self.end()


async def serve_http2(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ctx: TunnelContext,
    proxy: RequestProxy,
    first: bytes,
) -> None:
    session = _Session(writer, proxy, ctx)
    session.conn.initiate_connection()
    session.flush()
    data = first
    try:
        while data:
            try:
                events = session.conn.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                log.info("HTTP/2 protocol error from %s: %s", ctx.peer.principal, e)
                session.flush()  # the GOAWAY h2 queued
                break
            session.handle(events)
            if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                break
            await writer.drain()
            data = await reader.read(_READ)
    except (ConnectionError, OSError):
        pass
    finally:
        tasks = [s.task for s in session.streams.values() if s.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(OSError):
            writer.close()
