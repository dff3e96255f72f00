"""The in-memory pipe between an HBONE stream and the waypoint's HTTP code (waypoint/pipe.py)."""

from __future__ import annotations

import asyncio

import pytest

from waypoint.pipe import PipeEnd, stream_pipe


class Recorder(asyncio.BufferedProtocol):
    """A buffered protocol (like the HBONE relay's) that records what happens to it."""

    def __init__(self, keep_open: bool = True, buffer: int = 7) -> None:
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: list[Exception | None] = []
        self.keep_open = keep_open
        self._buf = bytearray(buffer)  # small: delivery must loop over it
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, PipeEnd)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self._buf[:nbytes]

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")


def attach(end: PipeEnd, proto: Recorder) -> None:
    end.set_protocol(proto)
    proto.connection_made(end)
    end.resume_reading()


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_bytes_both_ways_and_what_came_before_the_protocol_waits() -> None:
    end, reader, writer = stream_pipe()
    writer.write(b"early ")  # before the relay attached: held, not lost
    proto = Recorder()
    attach(end, proto)
    await settle()
    writer.write(b"and late")
    assert bytes(proto.data) == b"early and late"
    end.write(memoryview(b"to the reader"))
    assert await reader.readexactly(13) == b"to the reader"


async def test_eof_each_way_is_a_half_close() -> None:
    end, reader, writer = stream_pipe()
    proto = Recorder()
    attach(end, proto)
    writer.write_eof()
    await settle()
    assert proto.events == ["eof"]  # kept open: the other direction goes on
    end.write(b"reply")
    end.write_eof()
    assert await reader.read() == b"reply"
    assert reader.at_eof()


async def test_close_reaches_the_peer_and_both_ends_end() -> None:
    end, _reader, writer = stream_pipe()
    proto = Recorder(keep_open=False)
    attach(end, proto)
    writer.close()
    await writer.wait_closed()
    await settle()
    assert proto.events == ["eof", "lost"] and proto.lost == [None]


async def test_abort_is_a_reset_for_the_peer() -> None:
    end, reader, _writer = stream_pipe()
    attach(end, Recorder())
    end.abort()
    await settle()
    with pytest.raises(ConnectionResetError):
        await reader.read(10)


async def test_writing_to_a_closed_peer_is_a_broken_pipe() -> None:
    end, _reader, writer = stream_pipe()
    proto = Recorder()
    attach(end, proto)
    writer.close()
    await settle()
    end.write(b"nobody reads this")
    await settle()
    assert isinstance(proto.lost[-1], BrokenPipeError)


async def test_a_paused_reader_holds_bytes_and_pauses_the_writer() -> None:
    end, _reader, writer = stream_pipe()
    proto = Recorder(buffer=64 * 1024)
    attach(end, proto)
    end.pause_reading()
    writer.transport.set_write_buffer_limits(high=100, low=10)
    writer.write(b"x" * 60)
    writer.write(b"y" * 60)  # 120 held > high: the writer must pause
    assert writer.transport.get_write_buffer_size() == 120
    drained = asyncio.ensure_future(writer.drain())
    await settle()
    assert not drained.done() and proto.data == b""
    end.resume_reading()
    await asyncio.wait_for(drained, 1.0)
    assert bytes(proto.data) == b"x" * 60 + b"y" * 60  # in order, nothing lost
    assert writer.transport.get_write_buffer_size() == 0


async def test_the_stream_reader_pausing_holds_data_in_order() -> None:
    end, reader, _writer = stream_pipe()
    attach(end, Recorder())
    big = bytes(range(256)) * 4096  # 1 MiB: above the reader's limit, so it pauses the pipe
    for i in range(0, len(big), 65536):
        end.write(big[i : i + 65536])
    end.write_eof()
    got = bytearray()
    while chunk := await reader.read(100_000):
        got += chunk
    assert bytes(got) == big
